"""Triton kernels vs their plain-torch twins (pagedserve.kernels.reference).

Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py) on tiny shapes; the
tests marked `gpu` repeat the checks at real model shapes on CUDA. Every check draws fresh random
inputs and fills outputs (and unused KV-cache slots) with NaN first, so an element the kernel fails
to write, or a cache slot it wrongly reads, shows up as a mismatch.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels import reference as ref  # noqa: E402
from pagedserve.kernels.triton.activation import silu_and_mul  # noqa: E402
from pagedserve.kernels.triton.attention import (  # noqa: E402
    AttentionTuning,
    DecodeTiles,
    PrefillTiles,
    paged_attention,
)
from pagedserve.kernels.triton.kv_cache import write_kv_cache  # noqa: E402
from pagedserve.kernels.triton.norm import fused_add_rms_norm, rms_norm  # noqa: E402
from pagedserve.kernels.triton.rotary import rotary_embedding  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Small tiles so the interpreter exercises multi-tile loops and multi-partition decode cheaply.
TINY_TILES = PrefillTiles(block_m=16, block_n=16, num_warps=4, num_stages=2, k_trans=False)
SMALL = AttentionTuning(
    decode_partition_size=32,
    decode_tiles=DecodeTiles(16, 2, 2),
    decode_min_partition=0,
    prefill_long=TINY_TILES,
    prefill_short=TINY_TILES,
)
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    # bf16: one ulp is up to 2^-7 relative and the twin rounds twice in places: allow ~2 ulp.
    torch.bfloat16: {"atol": 1e-2, "rtol": 2e-2},
}


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, exact: bool = False) -> None:
    tol = {"atol": 0.0, "rtol": 0.0} if exact else TOL[dtype]
    torch.testing.assert_close(got, want, atol=tol["atol"], rtol=tol["rtol"])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)


# ---------------------------------------------------------------------------------------------
# Paged attention cases
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class PagedCase:
    query: torch.Tensor  # [T, num_heads, head_dim]
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], NaN where unused
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, shuffled blocks, padding -> NaN block
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    scale: float
    max_query_len: int


def make_case(
    seq_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    extra_table_cols: int = 2,
) -> PagedCase:
    """A batch whose contexts live in randomly permuted physical blocks.

    Physical block 0 is never assigned and stays NaN; block-table padding points at it, and the
    unused tail of each request's last block is NaN too: reading anything past seq_len poisons the
    output.
    """
    g = _gen(seed)
    n_blocks = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(n_blocks) + 3
    perm = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    max_blocks = max(n_blocks) + extra_table_cols
    tables = torch.zeros((len(seq_lens), max_blocks), dtype=torch.int32)
    key_cache = torch.full(
        (num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE
    )
    value_cache = torch.full_like(key_cache, float("nan"))
    for i, (s, nb) in enumerate(zip(seq_lens, n_blocks)):
        blocks = [perm.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(blocks, dtype=torch.int32)
        pos = torch.arange(s)
        blk = torch.tensor(blocks, dtype=torch.long)[pos // block_size].to(DEVICE)
        off = (pos % block_size).to(DEVICE)
        key_cache[blk, off] = _randn((s, num_kv_heads, head_dim), dtype, g)
        value_cache[blk, off] = _randn((s, num_kv_heads, head_dim), dtype, g)
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    return PagedCase(
        query=_randn((qsl[-1], num_heads, head_dim), dtype, g),
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        scale=head_dim**-0.5,
        max_query_len=max(q_lens),
    )


def check_attention(
    case: PagedCase,
    sliding_window: int | None = None,
    tuning: AttentionTuning = SMALL,
    pass_max_query_len: bool = True,
) -> None:
    out = torch.full_like(case.query, float("nan"))
    args = (
        case.query,
        case.key_cache,
        case.value_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
    )
    got = paged_attention(
        *args,
        case.scale,
        sliding_window,
        max_query_len=case.max_query_len if pass_max_query_len else None,
        out=out,
        tuning=tuning,
    )
    assert got is out
    want = ref.paged_attention(*args, case.scale, sliding_window)
    assert not torch.isnan(got).any(), "kernel left output elements unwritten (or read poisoned cache slots)"
    assert_close(got.float(), want.float(), case.query.dtype)


# --- decode (every query length 1) -----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_block_boundaries_single_partition(seed: int) -> None:
    # Context lengths around one block of 16; whole context fits one partition (direct path).
    case = make_case([1, 15, 16, 17], [1, 1, 1, 1], 4, 2, 32, 16, torch.float32, seed)
    check_attention(case, tuning=AttentionTuning(decode_partition_size=64, decode_tiles=DecodeTiles(16, 2, 2), decode_min_partition=0))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dtype"),
    [(4, 2, torch.float32), (4, 1, torch.bfloat16), (2, 2, torch.float16)],  # GQA, MQA, MHA
)
def test_decode_multi_partition(heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    # partition 32, tiles of 16: contexts span 1..4 partitions, split + reduce path.
    case = make_case([1, 17, 33, 100, 64], [1] * 5, heads, kv_heads, 32, 16, dtype, seed=3)
    check_attention(case)


def test_decode_sliding_window() -> None:
    # window 20: early partitions of long contexts are skipped entirely; a window ending mid-tile.
    case = make_case([1, 15, 17, 50, 90], [1] * 5, 4, 2, 32, 16, torch.float32, seed=4)
    check_attention(case, sliding_window=20)


@pytest.mark.parametrize("block_size", [8, 32])
def test_decode_other_block_sizes(block_size: int) -> None:
    case = make_case([5, 31, 70], [1] * 3, 4, 2, 64, block_size, torch.float32, seed=5)
    check_attention(case, pass_max_query_len=False)


# --- prefill / chunked prefill / mixed -------------------------------------------------------


def test_prefill_block_boundaries() -> None:
    # Whole prompts (q_len == seq_len) of lengths around the block size of 16.
    case = make_case([1, 15, 16, 17], [1, 15, 16, 17], 4, 2, 32, 16, torch.float32, seed=6)
    check_attention(case)


def test_chunked_prefill_with_cached_prefix() -> None:
    # Second chunks: 23 of 40 and 28 of 33 tokens are already cached.
    case = make_case([40, 33], [17, 5], 4, 2, 32, 16, torch.float32, seed=7)
    check_attention(case, pass_max_query_len=False)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dtype"),
    [(4, 2, torch.float32), (4, 1, torch.bfloat16), (2, 2, torch.float16)],
)
def test_mixed_prefill_and_decode(heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    case = make_case([17, 30, 16, 9, 1], [1, 12, 1, 9, 1], heads, kv_heads, 32, 16, dtype, seed=8)
    check_attention(case)


def test_prefill_sliding_window() -> None:
    # window 7 < tile: rows at the start of a tile see keys from an earlier tile, later rows don't.
    case = make_case([40, 20, 33], [21, 20, 1], 4, 2, 32, 16, torch.float32, seed=9)
    check_attention(case, sliding_window=7)


@pytest.mark.parametrize("k_trans", [False, True])
def test_prefill_wide_window_unmasked_tiles(k_trans: bool) -> None:
    # window 33 spans several 16-key tiles: masked window edge, unmasked interior, masked diagonal.
    case = make_case([90, 70, 50], [30, 64, 1], 4, 2, 32, 16, torch.float32, seed=15)
    tiles = replace(TINY_TILES, k_trans=k_trans)
    check_attention(case, sliding_window=33, tuning=AttentionTuning(prefill_long=tiles, prefill_short=tiles))


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed: int) -> None:
    # Random mixes of decode rows, whole prompts and chunks; random GQA shape and window.
    rng = random.Random(seed)
    seq_lens = [rng.randint(1, 80) for _ in range(rng.randint(1, 4))]
    q_lens = [rng.choice([1, s, rng.randint(1, s)]) for s in seq_lens]
    heads, kv_heads = rng.choice([(4, 2), (4, 1), (2, 2), (8, 2), (6, 2)])
    window = rng.choice([None, rng.randint(1, 40)])
    case = make_case(seq_lens, q_lens, heads, kv_heads, 32, rng.choice([8, 16]), torch.float32, seed)
    check_attention(case, sliding_window=window)


@pytest.mark.parametrize("block_size", [8, 32])
def test_prefill_other_block_sizes_and_head_dim_64(block_size: int) -> None:
    case = make_case([20, 45], [20, 6], 2, 1, 64, block_size, torch.float32, seed=10)
    check_attention(case)


@pytest.mark.parametrize(("seq_lens", "q_lens"), [([70, 3], [70, 2]), ([150], [150])])
def test_prefill_default_tiles(seq_lens: list[int], q_lens: list[int]) -> None:
    # Production tiles: short (64 rows) for the first batch, long (128 rows, K transposed) for the
    # 150-token prompt; 8 query heads per KV head.
    case = make_case(seq_lens, q_lens, 8, 1, 32, 16, torch.bfloat16, seed=11)
    check_attention(case, tuning=AttentionTuning())


def test_decode_default_tuning() -> None:
    # Automatic partition choice (few programs -> many partition slots, so split + reduce).
    case = make_case([300, 1, 129, 128], [1, 1, 1, 1], 4, 2, 32, 16, torch.bfloat16, seed=16)
    check_attention(case, tuning=AttentionTuning())


def test_padding_rows_are_zero_without_out() -> None:
    case = make_case([5, 9], [2, 3], 4, 2, 32, 16, torch.float32, seed=12)
    padded = torch.cat([case.query, _randn((3, 4, 32), torch.float32, _gen(13))])
    args = (padded, case.key_cache, case.value_cache, case.block_tables, case.seq_lens, case.query_start_loc)
    got = paged_attention(*args, case.scale, tuning=SMALL)
    assert_close(got, ref.paged_attention(*args, case.scale), torch.float32)
    assert torch.equal(got[5:], torch.zeros_like(got[5:]))


def test_varlen_kernel_under_mixed_graph_padding() -> None:
    """The padding of a mixed-step CUDA graph (worker/mixed_graphs.py): token rows past the last
    request and request slots with no query rows (query_start_loc repeated, seq_len 1, table
    row [0, ...]) leave the real rows exactly as the unpadded launch computes them."""
    case = make_case([17, 30, 9], [1, 12, 9], 4, 2, 32, 16, torch.float32, seed=14)
    tokens, pad_tokens, pad_seqs = 22, 10, 5
    query = torch.cat([case.query, _randn((pad_tokens, 4, 32), torch.float32, _gen(15))])
    qsl = torch.cat([case.query_start_loc, torch.full((pad_seqs,), tokens, dtype=torch.int32, device=DEVICE)])
    seq_lens = torch.cat([case.seq_lens, torch.ones(pad_seqs, dtype=torch.int32, device=DEVICE)])
    tables = torch.cat([case.block_tables, torch.zeros((pad_seqs, case.block_tables.shape[1]), dtype=torch.int32,
                                                       device=DEVICE)])  # fmt: skip
    key_cache, value_cache = case.key_cache.clone(), case.value_cache.clone()
    key_cache[0, 0] = 1.0  # block 0 slot 0: what padding requests read (NaN elsewhere in block 0)
    value_cache[0, 0] = 1.0
    out = torch.full_like(query, float("nan"))
    got = paged_attention(query, key_cache, value_cache, tables, seq_lens, qsl, case.scale,
                          max_query_len=tokens + pad_tokens, out=out, tuning=SMALL)  # fmt: skip
    want = ref.paged_attention(case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
                               case.query_start_loc, case.scale)  # fmt: skip
    assert_close(got[:tokens], want, torch.float32)
    assert torch.isnan(got[tokens:]).all()  # rows no request owns: left as they were


def test_attention_rejects_bad_shapes() -> None:
    case = make_case([5], [5], 4, 2, 32, 16, torch.float32, seed=14)
    with pytest.raises(ValueError, match="num_kv_heads"):
        paged_attention(
            case.query[:, :3], case.key_cache, case.value_cache, case.block_tables,
            case.seq_lens, case.query_start_loc, case.scale,
        )  # fmt: skip
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention(
            case.query, case.key_cache, case.value_cache, case.block_tables,
            case.seq_lens, case.query_start_loc, case.scale, 0,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# KV write, norms, rotary, activation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache(dtype: torch.dtype) -> None:
    g = _gen(20)
    num_blocks, block_size, kvh, hd = 6, 16, 2, 32
    # key/value as strided views of a fused buffer, as a QKV projection would produce.
    fused = _randn((7, 2 * kvh + 1, hd), dtype, g)
    key, value = fused[:, :kvh], fused[:, kvh : 2 * kvh]
    slots = torch.tensor([17, -1, 0, 95, 15, 16, -1], dtype=torch.int64, device=DEVICE)
    caches = [
        torch.full((num_blocks, block_size, kvh, hd), float("nan"), dtype=dtype, device=DEVICE)
        for _ in range(4)
    ]
    write_kv_cache(key, value, caches[0], caches[1], slots)
    ref.write_kv_cache(key, value, caches[2], caches[3], slots)
    # NaN marks untouched slots on both sides: compare with NaNs equal.
    assert torch.equal(caches[0].isnan(), caches[2].isnan())
    torch.testing.assert_close(caches[0], caches[2], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(caches[1], caches[3], equal_nan=True, rtol=0, atol=0)
    assert int((~caches[0].isnan()).all(-1).all(-1).sum()) == 5  # exactly the 5 real slots


@pytest.mark.parametrize(("dtype", "hidden"), [(torch.float32, 64), (torch.bfloat16, 100)])
def test_rms_norm(dtype: torch.dtype, hidden: int) -> None:
    g = _gen(21)
    x = _randn((5, hidden), dtype, g) * 3
    w = _randn((hidden,), dtype, g)
    out = torch.full_like(x, float("nan"))
    got = rms_norm(x, w, 1e-6, out=out)
    assert got is out
    assert_close(got, ref.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_in_place(dtype: torch.dtype) -> None:
    g = _gen(22)
    x, res = _randn((2, 3, 48), dtype, g), _randn((2, 3, 48), dtype, g)
    w = _randn((48,), dtype, g)
    want_out, want_res = ref.fused_add_rms_norm(x, res, w, 1e-5)
    got_out, got_res = fused_add_rms_norm(x, res, w, 1e-5)
    assert_close(got_out, want_out, dtype)
    # The sum is one rounding on both sides: exact, except that the interpreter rounds
    # float32 -> bf16 by truncation (GPU: to nearest even), one ulp at most.
    exact = dtype != torch.bfloat16 or CUDA
    assert_close(got_res, want_res, dtype, exact=exact)
    # In place: outputs alias the inputs.
    xi, ri = x.clone(), res.clone()
    o, r = fused_add_rms_norm(xi, ri, w, 1e-5, out=xi, residual_out=ri)
    assert o.data_ptr() == xi.data_ptr() and r.data_ptr() == ri.data_ptr()
    assert_close(o, want_out, dtype)
    assert_close(r, want_res, dtype, exact=exact)


def _cos_sin_cache(max_pos: int, rot_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)


@pytest.mark.parametrize(
    ("is_neox", "rot_dim", "dtype"),
    [(True, 32, torch.float32), (False, 32, torch.float32), (True, 16, torch.bfloat16)],
)
def test_rotary_embedding(is_neox: bool, rot_dim: int, dtype: torch.dtype) -> None:
    g = _gen(23)
    q = _randn((6, 4, 32), dtype, g)
    k = _randn((6, 2, 32), dtype, g)
    positions = torch.tensor([0, 5, 1, 63, 17, 17], dtype=torch.int64, device=DEVICE)
    cache = _cos_sin_cache(64, rot_dim)
    got_q, got_k = rotary_embedding(positions, q, k, cache, is_neox)
    want_q, want_k = ref.rotary_embedding(positions, q, k, cache, is_neox)
    assert_close(got_q, want_q, dtype)
    assert_close(got_k, want_k, dtype)


@pytest.mark.parametrize(("dtype", "inter"), [(torch.float32, 40), (torch.bfloat16, 64)])
def test_silu_and_mul(dtype: torch.dtype, inter: int) -> None:
    x = _randn((3, 2 * inter), dtype, _gen(24)) * 4
    assert_close(silu_and_mul(x), ref.silu_and_mul(x), dtype)


def test_bad_inputs_raise_value_error() -> None:
    g = _gen(25)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(_randn((2, 5), torch.float32, g))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(_randn((2, 8), torch.float32, g), _randn((4,), torch.float32, g), 1e-6)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv = _randn((3, 1, 16), torch.float32, g)
        cache = torch.zeros((2, 4, 1, 16), device=DEVICE)
        write_kv_cache(kv, kv, cache, cache.clone(), torch.zeros(2, dtype=torch.int64, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# Backend objects
# ---------------------------------------------------------------------------------------------


def test_import_kernel_registry_does_not_import_triton() -> None:
    code = "import sys, pagedserve.kernels.registry; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})


def test_triton_backend_layer_matches_torch_backend() -> None:
    # One Attention layer step (KV write + attend) through the kernel registry, both sets.
    from pagedserve.kernels.registry import get_kernel_set
    from pagedserve.model_executor.layers.attention import Attention, AttentionMetadata
    from pagedserve.model_executor.layers.context import BuildContext

    ops, twins = get_kernel_set("triton"), get_kernel_set("torch")
    backend = ops.attention
    assert ops.name == "triton" and twins.name == "torch"
    assert backend.accepts_max_lens and backend.name == "triton"
    heads, kv_heads, hd, bs = 4, 2, 32, 16
    case = make_case([20, 9, 33], [4, 9, 1], heads, kv_heads, hd, bs, torch.float32, seed=40)
    g = _gen(41)
    num_tokens = case.query.shape[0]
    k_new = _randn((num_tokens, kv_heads * hd), torch.float32, g)
    v_new = _randn((num_tokens, kv_heads * hd), torch.float32, g)
    # Slots of the new tokens: the last q_len positions of each request.
    slots = []
    for i, (s_len, q_len) in enumerate(zip([20, 9, 33], [4, 9, 1])):
        for pos in range(s_len - q_len, s_len):
            slots.append(int(case.block_tables[i, pos // bs]) * bs + pos % bs)
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=case.query_start_loc,
        seq_lens=case.seq_lens,
        block_tables=case.block_tables,
        max_query_len=9,
        max_seq_len=33,
    )
    outs, caches = [], []
    for be in (backend, twins.attention):
        kc, vc = case.key_cache.clone(), case.value_cache.clone()
        layer = Attention(heads, hd, kv_heads, case.scale, BuildContext.create(attention=be))
        outs.append(layer(case.query.reshape(num_tokens, -1), k_new, v_new, (kc, vc), md))
        caches.append((kc, vc))
    assert_close(outs[0], outs[1], torch.float32)
    torch.testing.assert_close(caches[0][0], caches[1][0], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(caches[0][1], caches[1][1], equal_nan=True, rtol=0, atol=0)

    x = _randn((3, 64), torch.float32, g) * 2
    assert_close(ops.silu_and_mul(x), twins.silu_and_mul(x), torch.float32)
    w = _randn((64,), torch.float32, g)
    assert_close(ops.rms_norm(x, w, 1e-6), twins.rms_norm(x, w, 1e-6), torch.float32)


# ---------------------------------------------------------------------------------------------
# Real shapes on the GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window", [None, 1000])
def test_gpu_decode_real_shapes(dtype: torch.dtype, window: int | None) -> None:
    # batch 16, 32 heads / 8 KV heads, head_dim 128, contexts up to 2048 (several partitions).
    lens = [2048, 1, 15, 16, 17, 513, 1024, 2000, 777, 1500, 64, 300, 2047, 1999, 100, 1200]
    case = make_case(lens, [1] * 16, 32, 8, 128, 16, dtype, seed=30)
    check_attention(case, window, tuning=AttentionTuning())


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 700])
def test_gpu_prefill_mixed_real_shapes(dtype: torch.dtype, window: int | None) -> None:
    # Full prompts, chunked prefill with cached prefixes, and decode rows in one batch.
    seq = [2048, 1, 17, 1500, 2048, 900, 16, 1024]
    q = [2048, 1, 17, 500, 1, 256, 1, 1]
    case = make_case(seq, q, 32, 8, 128, 16, dtype, seed=31)
    check_attention(case, window, tuning=AttentionTuning())


@gpu
@needs_cuda
def test_gpu_head_dim_64_mqa() -> None:
    case = make_case([1000, 300, 5], [200, 1, 5], 16, 1, 64, 16, torch.bfloat16, seed=32)
    check_attention(case, tuning=AttentionTuning())
    dec = make_case([1000, 300, 5], [1, 1, 1], 16, 1, 64, 16, torch.bfloat16, seed=33)
    check_attention(dec, tuning=AttentionTuning())


@gpu
@needs_cuda
def test_gpu_elementwise_real_shapes() -> None:
    g = _gen(34)
    x = _randn((512, 4096), torch.bfloat16, g)
    res = _randn((512, 4096), torch.bfloat16, g)
    w = _randn((4096,), torch.bfloat16, g)
    assert_close(rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), torch.bfloat16)
    got = fused_add_rms_norm(x, res, w, 1e-5)
    want = ref.fused_add_rms_norm(x, res, w, 1e-5)
    assert_close(got[0], want[0], torch.bfloat16)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    gu = _randn((512, 2 * 11008), torch.bfloat16, g)
    assert_close(silu_and_mul(gu), ref.silu_and_mul(gu), torch.bfloat16)
    q, k = _randn((512, 32, 128), torch.bfloat16, g), _randn((512, 8, 128), torch.bfloat16, g)
    pos = torch.randint(0, 4096, (512,), generator=g, device=DEVICE)
    cache = _cos_sin_cache(4096, 128)
    for a, b in zip(rotary_embedding(pos, q, k, cache), ref.rotary_embedding(pos, q, k, cache)):
        assert_close(a, b, torch.bfloat16)
    slots = torch.randperm(64 * 16, generator=g, device=DEVICE)[:512]
    slots[::7] = -1
    kc = [torch.full((64, 16, 8, 128), float("nan"), dtype=torch.bfloat16, device=DEVICE) for _ in range(4)]
    write_kv_cache(k, k, kc[0], kc[1], slots)
    ref.write_kv_cache(k, k, kc[2], kc[3], slots)
    torch.testing.assert_close(kc[0], kc[2], equal_nan=True, rtol=0, atol=0)
