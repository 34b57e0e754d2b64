"""The plain-torch kernel twins against direct, independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import reference as ref


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int], scale: float, window: int | None
) -> torch.Tensor:
    """Textbook attention in float64, one query at a time. q [n, H, d]; k, v [L, KVH, d]."""
    num_heads, num_kv = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, p in enumerate(q_pos):
        lo = 0 if window is None else max(0, p - window + 1)
        for h in range(num_heads):
            kh = h // (num_heads // num_kv)
            scores = (k[lo : p + 1, kh].double() @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(scores, 0) @ v[lo : p + 1, kh].double()
    return out


def _scatter_requests(
    ctx_lens: list[int],
    new_lens: list[int],
    num_heads: int,
    num_kv: int,
    head_dim: int,
    block_size: int,
    window: int | None,
    seed: int,
) -> None:
    """Build B requests whose first ctx-new tokens are cached already, write the new tokens' K/V
    via write_kv_cache into a shuffled, non-contiguous block table, and compare."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(n / block_size) for n in ctx_lens) + 5
    perm = torch.randperm(num_blocks, generator=g).tolist()
    key_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=g)  # garbage
    value_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=g)
    max_blocks = max(math.ceil(n / block_size) for n in ctx_lens) + 2
    block_tables = torch.full((len(ctx_lens), max_blocks), 10_000, dtype=torch.int32)  # padding
    queries, new_k, new_v, slots, expected = [], [], [], [], []
    for i, (ctx, new) in enumerate(zip(ctx_lens, new_lens)):
        nb = math.ceil(ctx / block_size)
        blocks, perm = perm[:nb], perm[nb:]
        block_tables[i, :nb] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(ctx, num_kv, head_dim, generator=g)
        v = torch.randn(ctx, num_kv, head_dim, generator=g)
        q = torch.randn(new, num_heads, head_dim, generator=g)
        for p in range(ctx):
            slot = blocks[p // block_size] * block_size + p % block_size
            if p < ctx - new:  # cached prefix: put it in place directly
                key_cache[slot // block_size, slot % block_size] = k[p]
                value_cache[slot // block_size, slot % block_size] = v[p]
            else:
                slots.append(slot)
        new_k.append(k[ctx - new :])
        new_v.append(v[ctx - new :])
        queries.append(q)
        expected.append(_dense_attention(q, k, v, list(range(ctx - new, ctx)), 0.3, window))
    # one padding token at the end: slot -1, no owner request
    key_new = torch.cat([*new_k, torch.randn(1, num_kv, head_dim, generator=g)])
    value_new = torch.cat([*new_v, torch.randn(1, num_kv, head_dim, generator=g)])
    query = torch.cat([*queries, torch.randn(1, num_heads, head_dim, generator=g)])
    ref.write_kv_cache(
        key_new, value_new, key_cache, value_cache, torch.tensor([*slots, -1], dtype=torch.int64)
    )
    qsl = torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = ref.paged_attention(
        query,
        key_cache,
        value_cache,
        block_tables,
        torch.tensor(ctx_lens, dtype=torch.int32),
        qsl,
        0.3,
        window,
    )
    assert out.shape == query.shape and out.dtype == query.dtype
    torch.testing.assert_close(out[:-1].double(), torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert torch.all(out[-1] == 0)  # padding row


@pytest.mark.parametrize("num_heads,num_kv", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("window", [None, 8], ids=["full", "window8"])
def test_paged_attention_prefill_each_length(num_heads: int, num_kv: int, window: int | None) -> None:
    lens = [1, 15, 16, 17, 40]
    _scatter_requests(lens, lens, num_heads, num_kv, 8, 16, window, seed=1)


@pytest.mark.parametrize("num_heads,num_kv", [(4, 2), (6, 1)], ids=["GQA", "MQA"])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_with_cached_prefix(num_heads: int, num_kv: int, window: int | None) -> None:
    # chunked prefill (prefix cached, several new), decode (one new), fresh prefill, one block exact
    _scatter_requests([40, 17, 9, 16, 33], [7, 1, 9, 1, 16], num_heads, num_kv, 16, 4, window, seed=2)


def test_paged_attention_keeps_half_precision_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(4, 4, 1, 8, generator=g).to(torch.bfloat16)
    q = torch.randn(3, 2, 8, generator=g).to(torch.bfloat16)
    out = ref.paged_attention(
        q,
        kc,
        kc.clone(),
        torch.tensor([[2, 0]], dtype=torch.int32),
        torch.tensor([6], dtype=torch.int32),
        torch.tensor([0, 3], dtype=torch.int32),
        0.5,
    )
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


def test_write_kv_cache_skips_padding_slots() -> None:
    kc = torch.zeros(3, 4, 2, 2)
    vc = torch.zeros(3, 4, 2, 2)
    key = torch.arange(1, 4, dtype=torch.float32)[:, None, None].expand(3, 2, 2).contiguous()
    ref.write_kv_cache(key, -key, kc, vc, torch.tensor([9, -1, 2]))  # 9 = block 2, offset 1
    assert torch.all(kc[2, 1] == 1) and torch.all(vc[2, 1] == -1)
    assert torch.all(kc[0, 2] == 3) and torch.all(vc[0, 2] == -3)
    written = torch.zeros(3, 4, dtype=torch.bool)
    written[2, 1] = written[0, 2] = True
    assert torch.all(kc[~written] == 0) and torch.all(vc[~written] == 0)  # token 1 went nowhere


def test_write_kv_cache_into_non_contiguous_cache() -> None:
    both = torch.zeros(3, 2, 4, 1, 2)  # [blocks, k/v, block_size, kvh, d]: interleaved k and v
    kc, vc = both[:, 0], both[:, 1]
    assert not kc.is_contiguous()
    ref.write_kv_cache(
        torch.ones(2, 1, 2), torch.full((2, 1, 2), 2.0), kc, vc, torch.tensor([0, 11])
    )  # block 0 offset 0; block 2 offset 3
    assert torch.all(both[0, 0, 0] == 1) and torch.all(both[2, 0, 3] == 1)
    assert torch.all(both[0, 1, 0] == 2) and torch.all(both[2, 1, 3] == 2)
    assert both.count_nonzero() == 8


def test_varlen_causal_attention_matches_sdpa() -> None:
    g = torch.Generator().manual_seed(3)
    lens = [5, 1, 12]
    q = torch.randn(18, 4, 8, generator=g)
    k = torch.randn(18, 2, 8, generator=g)
    v = torch.randn(18, 2, 8, generator=g)
    out = ref.varlen_causal_attention(q, k, v, torch.tensor([0, 5, 6, 18]), 0.35)
    start = 0
    for n in lens:
        s = slice(start, start + n)
        exp = F.scaled_dot_product_attention(
            q[s].transpose(0, 1),
            k[s].repeat_interleave(2, 1).transpose(0, 1),
            v[s].repeat_interleave(2, 1).transpose(0, 1),
            is_causal=True,
            scale=0.35,
        )
        torch.testing.assert_close(out[s], exp.transpose(0, 1), atol=1e-5, rtol=1e-5)
        start += n


def test_rms_norm_and_fused_add() -> None:
    g = torch.Generator().manual_seed(4)
    x, res, w = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g), torch.randn(16, generator=g)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-5), expected)
    normed, summed = ref.fused_add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(summed, x + res)
    torch.testing.assert_close(normed, ref.rms_norm(x + res, w, 1e-5))
    xb = x.to(torch.bfloat16)
    assert ref.rms_norm(xb, w.to(torch.bfloat16), 1e-5).dtype == torch.bfloat16


def _cos_sin_cache(max_pos: int, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    freqs = torch.arange(max_pos).float()[:, None] * inv[None]
    return torch.cat((freqs.cos(), freqs.sin()), -1)


def test_rotary_neox_matches_complex_rotation() -> None:
    # NeoX / HF rotate_half pairs feature j with j + d/2: (x_j + i x_{j+d/2}) * e^{i pos f_j}
    g = torch.Generator().manual_seed(5)
    d = 8
    q, k = torch.randn(6, 3, d, generator=g), torch.randn(6, 1, d, generator=g)
    pos = torch.tensor([0, 1, 7, 100, 3, 3])
    cache = _cos_sin_cache(128, d)
    q2, k2 = ref.rotary_embedding(pos, q, k, cache, is_neox=True)
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2).float() / d)
    rot = torch.polar(torch.ones(6, d // 2), pos[:, None].float() * inv[None])[:, None]
    for x, y in ((q, q2), (k, k2)):
        c = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * rot
        torch.testing.assert_close(y, torch.cat((c.real, c.imag), -1), atol=1e-5, rtol=1e-5)
    assert torch.equal(ref.rotary_embedding(pos[:1], q[:1], k[:1], cache)[0], q[:1])  # pos 0


def test_rotary_gptj_interleaved_and_partial() -> None:
    g = torch.Generator().manual_seed(6)
    d, rot_dim = 8, 4
    q, k = torch.randn(4, 2, d, generator=g), torch.randn(4, 2, d, generator=g)
    pos = torch.tensor([2, 5, 9, 0])
    cache = _cos_sin_cache(16, rot_dim)
    q2, _ = ref.rotary_embedding(pos, q, k, cache, is_neox=False)
    inv = 1.0 / 10000.0 ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    rot = torch.polar(torch.ones(4, rot_dim // 2), pos[:, None].float() * inv[None])[:, None]
    c = torch.view_as_complex(q[..., :rot_dim].reshape(4, 2, rot_dim // 2, 2).contiguous()) * rot
    torch.testing.assert_close(q2[..., :rot_dim], torch.view_as_real(c).flatten(-2))
    assert torch.equal(q2[..., rot_dim:], q[..., rot_dim:])  # pass-through features


def test_silu_and_mul() -> None:
    x = torch.randn(3, 10)
    torch.testing.assert_close(ref.silu_and_mul(x), F.silu(x[:, :5]) * x[:, 5:])
