"""The fused rotary + KV-cache write kernel and the device-side decode partition split, against
their plain-torch twins (interpreter on CPU, tiny shapes; `gpu` cases at real shapes)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_kernels import (  # noqa: E402 (tests/kernels has no __init__: on sys.path)
    DEVICE,
    _cos_sin_cache,
    _gen,
    _randn,
    assert_close,
    gpu,
    make_case,
    needs_cuda,
)

from pagedserve.kernels import reference as ref  # noqa: E402
from pagedserve.kernels.triton.attention import AttentionTuning, DecodeTiles, paged_attention  # noqa: E402
from pagedserve.kernels.triton.attention_decode import paged_decode_attention  # noqa: E402
from pagedserve.kernels.triton.rotary import rotary_write_kv_cache  # noqa: E402


def _check_rotary_write(num_tokens: int, heads: int, kv_heads: int, head_dim: int, rot_dim: int,
                        is_neox: bool, dtype: torch.dtype, slots: list[int], seed: int,
                        num_blocks: int = 5) -> None:
    g = _gen(seed)
    # q, k, v as strided views of one QKV projection output, as the model produces them.
    qkv = _randn((num_tokens, (heads + 2 * kv_heads) * head_dim), dtype, g)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(num_tokens, kv_heads, head_dim)
    positions = torch.randint(0, 64, (num_tokens,), generator=g, device=DEVICE)
    cache = _cos_sin_cache(64, rot_dim)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    caches = [torch.full((num_blocks, 16, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE) for _ in range(4)]
    qkv_ref = qkv.clone()
    q_ref = qkv_ref[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    got = rotary_write_kv_cache(positions, q, k, v, cache, is_neox, caches[0], caches[1], slot_mapping)
    want = ref.rotary_write_kv_cache(positions, q_ref, k, v, cache, is_neox, caches[2], caches[3], slot_mapping)
    assert got.data_ptr() == q.data_ptr() and want.data_ptr() == q_ref.data_ptr()  # in place
    assert_close(qkv[:, : heads * head_dim], qkv_ref[:, : heads * head_dim], dtype)
    # K/V untouched in the projection output; the caches hold exactly the non-padding rows.
    assert torch.equal(qkv[:, heads * head_dim :], qkv_ref[:, heads * head_dim :])
    assert torch.equal(caches[0].isnan(), caches[2].isnan())
    assert_close(torch.nan_to_num(caches[0]), torch.nan_to_num(caches[2]), dtype)
    torch.testing.assert_close(caches[1], caches[3], equal_nan=True, rtol=0, atol=0)
    assert int((~caches[0].isnan()).all(-1).all(-1).sum()) == sum(s >= 0 for s in slots)


@pytest.mark.parametrize(
    ("is_neox", "rot_dim", "dtype", "heads", "kv_heads"),
    [
        (True, 32, torch.float32, 4, 2),
        (False, 32, torch.float32, 4, 2),  # gpt-j interleaved pairs
        (True, 16, torch.bfloat16, 4, 1),  # partial rotary: the tail passes through
        (False, 8, torch.float32, 3, 3),  # odd head counts (padded tiles), partial, interleaved
    ],
)
def test_rotary_write_kv_cache(is_neox: bool, rot_dim: int, dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    _check_rotary_write(6, heads, kv_heads, 32, rot_dim, is_neox, dtype, [17, -1, 0, 79, 15, -1], seed=50)


def test_rotary_write_kv_cache_rejects_bad_inputs() -> None:
    q = torch.zeros((2, 4, 32), device=DEVICE)
    k = torch.zeros((2, 2, 32), device=DEVICE)
    kc = torch.zeros((3, 16, 2, 32), device=DEVICE)
    pos = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    cache = _cos_sin_cache(8, 32)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary_write_kv_cache(pos, q, k, k, cache, True, kc, kc.clone(), pos[:1])
    with pytest.raises(ValueError, match="dtype"):
        rotary_write_kv_cache(pos, q, k, k, cache, True, kc.half(), kc.half(), pos)
    with pytest.raises(ValueError, match="rot_dim"):
        rotary_write_kv_cache(pos, q, k, k, _cos_sin_cache(8, 34), True, kc, kc.clone(), pos)


# --- decode: the per-request split of a context over P partition slots -----------------------


def _decode(case, num_partitions: int, block_n: int, window: int | None = None) -> None:  # type: ignore[no-untyped-def]
    out = torch.full_like(case.query, float("nan"))
    args = (case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens, case.query_start_loc)
    got = paged_decode_attention(*args, case.scale, window, out, num_partitions, block_n=block_n,
                                 num_warps=2, num_stages=1)
    want = ref.paged_attention(*args, case.scale, window)
    assert not torch.isnan(got).any(), "a decode row was left unwritten"
    assert_close(got.float(), want.float(), case.query.dtype)


@pytest.mark.parametrize("num_partitions", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("window", [None, 20])
def test_decode_any_partition_count(num_partitions: int, window: int | None) -> None:
    # Contexts 1/15/16/17 and longer ones over 1..many live partitions (P=40 > tiles of most
    # requests: slots past `live` return at once), with and without a window; GQA 2.
    case = make_case([1, 15, 16, 17, 50, 100], [1] * 6, 4, 2, 32, 16, torch.float32, seed=51)
    _decode(case, num_partitions, block_n=16, window=window)


@pytest.mark.parametrize(("heads", "kv_heads", "dtype"), [(4, 1, torch.bfloat16), (6, 2, torch.float16)])
def test_decode_split_mqa_and_group_3(heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    case = make_case([33, 5, 64], [1] * 3, heads, kv_heads, 32, 8, dtype, seed=52)
    _decode(case, 5, block_n=16)


@pytest.mark.parametrize("min_partition", [0, 128])
def test_decode_short_context_in_long_grid(min_partition: int) -> None:
    # The CUDA-graph situation: block tables sized for far more than the real contexts (max_seq_len
    # 4096), graph padding rows with seq_len 1 on block 0. Default tuning; every row is written.
    case = make_case([40, 3, 1], [1] * 3, 4, 2, 32, 16, torch.bfloat16, seed=53, extra_table_cols=254)
    case.key_cache[0, 0] = _randn(tuple(case.key_cache.shape[2:]), torch.bfloat16, _gen(54))
    case.value_cache[0, 0] = _randn(tuple(case.value_cache.shape[2:]), torch.bfloat16, _gen(55))
    pad_tables = torch.cat([case.block_tables, torch.zeros_like(case.block_tables[:2])])
    pad_lens = torch.cat([case.seq_lens, torch.ones(2, dtype=torch.int32, device=DEVICE)])
    query = torch.cat([case.query, _randn((2, 4, 32), torch.bfloat16, _gen(56))])
    qsl = torch.arange(6, dtype=torch.int32, device=DEVICE)
    args = (query, case.key_cache, case.value_cache, pad_tables, pad_lens, qsl)
    assert pad_tables.shape[1] * 16 >= 4096
    got = paged_attention(*args, case.scale, max_query_len=1, max_seq_len=pad_tables.shape[1] * 16,
                          tuning=AttentionTuning(decode_tiles=DecodeTiles(16, 2, 2), decode_min_partition=min_partition))
    assert_close(got.float(), ref.paged_attention(*args, case.scale).float(), torch.bfloat16)


def test_decode_padding_rows_zero_without_out() -> None:
    # T > B in a decode batch: rows [B, T) belong to no request and come back as zeros (twin
    # contract) although the output is not memset as a whole.
    case = make_case([5, 30], [1, 1], 4, 2, 32, 16, torch.float32, seed=57)
    query = torch.cat([case.query, _randn((3, 4, 32), torch.float32, _gen(58))])
    args = (query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens, case.query_start_loc)
    for max_q in (1, None):
        got = paged_attention(*args, case.scale, max_query_len=max_q,
                              tuning=AttentionTuning(decode_partition_size=16, decode_tiles=DecodeTiles(16, 2, 2)))
        assert_close(got, ref.paged_attention(*args, case.scale), torch.float32)
        assert torch.equal(got[2:], torch.zeros_like(got[2:]))


def test_decode_zero_query_len_goes_to_varlen_kernel() -> None:
    # Without max_query_len, a batch with a q_len-0 request is not treated as decode (its row
    # would belong to nobody); the result still matches the twin.
    case = make_case([5, 9, 7], [1, 0, 1], 4, 2, 32, 16, torch.float32, seed=59)
    query = torch.cat([case.query, _randn((1, 4, 32), torch.float32, _gen(60))])
    args = (query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens, case.query_start_loc)
    got = paged_attention(*args, case.scale)
    assert_close(got, ref.paged_attention(*args, case.scale), torch.float32)


# --- the layer: fused path vs the torch backend's rotary-then-write path ----------------------


@pytest.mark.parametrize("with_cache", [True, False])
def test_attention_forward_rotary_backends_agree(with_cache: bool) -> None:
    from pagedserve.kernels.registry import get_kernel_set
    from pagedserve.model_executor.layers.attention import Attention, AttentionMetadata
    from pagedserve.model_executor.layers.context import BuildContext
    from pagedserve.model_executor.layers.rotary import RopeConfig, RotaryEmbedding

    heads, kv_heads, hd, bs = 4, 2, 32, 16
    seq, qlen = [20, 9, 33], [4, 9, 1]
    case = make_case(seq, qlen, heads, kv_heads, hd, bs, torch.float32, seed=61)
    num_tokens = case.query.shape[0]
    g = _gen(62)
    qkv = _randn((num_tokens, (heads + 2 * kv_heads) * hd), torch.float32, g)
    positions, slots = [], []
    for i, (s_len, q_len) in enumerate(zip(seq, qlen)):
        for pos in range(s_len - q_len, s_len):
            positions.append(pos)
            slots.append(int(case.block_tables[i, pos // bs]) * bs + pos % bs)
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=case.query_start_loc,
        seq_lens=case.seq_lens,
        block_tables=case.block_tables,
        max_query_len=9,
        max_seq_len=33,
    )
    pos_t = torch.tensor(positions, dtype=torch.int64, device=DEVICE)
    with torch.device(DEVICE):
        rotary = RotaryEmbedding(hd, 64, RopeConfig("default", 10000.0), ctx=BuildContext.create())
    outs, caches = [], []
    triton_backend = get_kernel_set("triton").attention
    assert triton_backend.rotary_write_kv is not None
    assert get_kernel_set("torch").attention.rotary_write_kv is None
    for be in (triton_backend, get_kernel_set("torch").attention):
        kc, vc = case.key_cache.clone(), case.value_cache.clone()
        x = qkv.clone()
        q, k, v = x[:, : heads * hd], x[:, heads * hd : (heads + kv_heads) * hd], x[:, (heads + kv_heads) * hd :]
        layer = Attention(heads, hd, kv_heads, case.scale, BuildContext.create(attention=be))
        if not with_cache:  # profiling run: whole prompts, no cache
            md.query_start_loc = torch.tensor([0, 4, 13, 14], dtype=torch.int32, device=DEVICE)
        outs.append(layer.forward_rotary(pos_t, q, k, v, rotary, (kc, vc) if with_cache else None, md))
        caches.append((kc, vc))
    assert_close(outs[0], outs[1], torch.float32)
    torch.testing.assert_close(caches[0][0], caches[1][0], equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0][1], caches[1][1], equal_nan=True, rtol=0, atol=0)


# --- real shapes on the GPU ------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("seq_len", [1, 128, 2048])
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_decode_graph_grid(seq_len: int, batch: int) -> None:
    # Llama-3-8B shapes, grid sized for 4096 tokens as in the decode CUDA graphs.
    lens = [max(1, seq_len - (i * 37) % max(1, seq_len // 2)) for i in range(batch)]
    case = make_case(lens, [1] * batch, 32, 8, 128, 16, torch.bfloat16, seed=63,
                     extra_table_cols=256 - -(-max(lens) // 16))
    args = (case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens, case.query_start_loc)
    got = paged_attention(*args, case.scale, max_query_len=1, max_seq_len=4096)
    assert_close(got.float(), ref.paged_attention(*args, case.scale).float(), torch.bfloat16)


@gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 512])
def test_gpu_rotary_write_kv_real_shapes(num_tokens: int) -> None:
    slots = torch.randperm(80 * 16, generator=torch.Generator().manual_seed(num_tokens))[:num_tokens].tolist()
    slots[::7] = [-1] * len(slots[::7])
    _check_rotary_write(num_tokens, 32, 8, 128, 128, True, torch.bfloat16, slots, seed=64, num_blocks=80)
