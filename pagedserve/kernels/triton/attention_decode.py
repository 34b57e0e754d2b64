"""Triton paged decode attention, flash-decoding style (every request has exactly one new token).

Work split (grid = (B, num_kv_heads, P); P partition slots, chosen on the host from the batch size
and max_seq_len; the split of each request's context is chosen ON THE DEVICE from its real
seq_len, so a CUDA graph sized for 4096 tokens still spreads a 128-token context over P slots)::

    live keys of request b:   [win_lo, seq_len)          win_lo = max(seq_len - window, 0) or 0
    base = win_lo rounded down to BLOCK_N;  span = seq_len - base
    part_len = max(roundup(cdiv(span, P), BLOCK_N), min_part);  live = cdiv(span, part_len) <= P
    (min_part: a multiple of BLOCK_N; a context of <= min_part keys is done by one program per KV
    head that writes the output itself, so short contexts need no reduce at all)

    base                                                   seq_len
     | part 0 (part_len) | part 1 | ... | part live-1 |  slots live..P-1 return at once
         |                   |                |
    program (b, g, p):   softmax state of the GROUP query heads of KV head g over part p
                         live == 1: normalise and write out[b] itself (no reduce needed)
                         live  > 1: write o_p = acc / l and lse_p = m + log2(l) (log2 domain)
    reduce (b, h):       live > 1 only: out = sum_p 2^(lse_p - M) o_p / sum_p 2^(lse_p - M)

Every live partition holds at least one visible key (part 0 starts at base <= win_lo < base +
BLOCK_N; later ones start at a tile edge before seq_len), so m is finite after its first tile and
l > 0. seq_len == 0 (not produced by the engine) gives live == 0: part 0 writes a zero row.

Inside a partition a program walks key tiles of BLOCK_N tokens (tile edges are multiples of
BLOCK_N). Each key position is translated through the block table (pos ->
block_tables[b, pos // block_size], slot pos % block_size), so tiles may span several physical
blocks and the blocks need not be contiguous or ordered. One program serves all GROUP = num_heads /
num_kv_heads query heads of its KV head (rows of the tl.dot, padded to >= 16), so each K/V element
is read from memory once. Scores are kept in the log2 domain (scale * log2(e) folded into one
multiply) and softmax state in float32.

ALiBi (ALIBI constexpr, slopes pointer): score += slope_h * (key pos - (seq_len - 1)); the
reduce is unchanged (it combines log-sum-exps, whatever the scores were).

Every output row of a request is written (by the partition kernel or the reduce), so the caller
needs no zero-filled output buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# the same inside @triton.jit code, which may read only constexpr globals (the interpreter reads
# plain floats too, so only a compiled kernel catches this)
LOG2E_JIT = tl.constexpr(LOG2E)


@triton.jit
def _live_split(seq_len, window, num_partitions, min_part, BLOCK_N: tl.constexpr):
    """(win_lo, base, part_len, live) of one request; identical in both kernels."""
    win_lo = seq_len * 0
    if window > 0:
        win_lo = tl.maximum(seq_len - window, 0)
    base = (win_lo // BLOCK_N) * BLOCK_N
    span = seq_len - base
    part_len = tl.maximum(tl.cdiv(tl.cdiv(span, num_partitions), BLOCK_N) * BLOCK_N, min_part)
    live = tl.cdiv(span, part_len)
    return win_lo, base, part_len, live


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    alibi_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    window,
    num_heads,
    num_partitions,
    min_part,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    ALIBI: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    win_lo, base, part_len, live = _live_split(seq_len, window, num_partitions, min_part, BLOCK_N)
    if part >= tl.maximum(live, 1):
        return
    part_start = base + part * part_len
    lo = tl.maximum(part_start, win_lo)
    hi = tl.minimum(seq_len, part_start + part_len)

    g = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + g  # [GROUP_PAD]
    dims = tl.arange(0, DIM_PAD)
    dmask = dims < HEAD_DIM
    qmask = (g < GROUP)[:, None] & dmask[None, :]
    q_row = tl.load(query_start_loc_ptr + b).to(tl.int64)
    q = tl.load(q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=qmask, other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)  # [GROUP_PAD, DIM_PAD]

    if ALIBI:  # [GROUP_PAD] slopes of this KV head's query heads, log2 domain
        slope = tl.load(alibi_ptr + heads, mask=g < GROUP, other=0.0) * LOG2E_JIT
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh
    # part_start is a tile edge and the first tile holds a key in [lo, hi) (see the docstring).
    for n0 in range(part_start, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute key positions
        valid = (pos >= lo) & (pos < hi)
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        # V is loaded right after K (both depend only on blk), so the two loads overlap.
        k = tl.load(
            k_head + blk[None, :] * stride_kb + slot[None, :] * stride_ks + dims[:, None],
            mask=valid[None, :] & dmask[:, None],
            other=0.0,
        )  # [DIM_PAD, BLOCK_N]
        v = tl.load(
            v_head + blk[:, None] * stride_vb + slot[:, None] * stride_vs + dims[None, :],
            mask=valid[:, None] & dmask[None, :],
            other=0.0,
        )  # [BLOCK_N, DIM_PAD]
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if ALIBI:  # the query sits at position seq_len - 1
            s = s * qk_scale + slope[:, None] * (pos - (seq_len - 1)).to(tl.float32)[None, :]
        else:
            s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))  # [GROUP_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # l_i == 0 only for seq_len == 0 (no tile ran): a zero row.
    inv_l = tl.where(l_i > 0.0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)
    o = acc * inv_l[:, None]
    if live <= 1:
        tl.store(
            out_ptr + q_row * stride_ot + heads[:, None] * stride_oh + dims[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=qmask,
        )
    else:
        # part_* are contiguous: lse [B, num_heads, P], out [B, num_heads, P, HEAD_DIM].
        idx = (b.to(tl.int64) * num_heads + heads) * num_partitions + part  # [GROUP_PAD]
        tl.store(part_lse_ptr + idx, m_i + tl.log2(l_i), mask=g < GROUP)
        tl.store(part_out_ptr + idx[:, None] * HEAD_DIM + dims[None, :], o, mask=qmask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    stride_ot,
    stride_oh,
    window,
    num_heads,
    num_partitions,
    min_part,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    P_CHUNK: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    _, _, _, live = _live_split(seq_len, window, num_partitions, min_part, BLOCK_N)
    if live <= 1:
        return  # the partition kernel wrote this row itself
    base = (b.to(tl.int64) * num_heads + h) * num_partitions
    dims = tl.arange(0, DIM_PAD)
    dmask = dims < HEAD_DIM
    ps = tl.arange(0, P_CHUNK)
    # Online combination over chunks of P_CHUNK live partitions (usually a single chunk).
    m_run = tl.max(tl.full([P_CHUNK], float("-inf"), dtype=tl.float32), axis=0)
    w_sum = tl.sum(tl.zeros([P_CHUNK], dtype=tl.float32), axis=0)
    acc = tl.zeros([DIM_PAD], dtype=tl.float32)
    for p0 in range(0, live, P_CHUNK):
        pmask = (p0 + ps) < live
        lse = tl.load(part_lse_ptr + base + p0 + ps, mask=pmask, other=float("-inf"))
        o = tl.load(
            part_out_ptr + (base + p0 + ps)[:, None] * HEAD_DIM + dims[None, :],
            mask=pmask[:, None] & dmask[None, :],
            other=0.0,
        )  # [P_CHUNK, DIM_PAD]
        m_new = tl.maximum(m_run, tl.max(lse, axis=0))  # finite: chunk 0 holds live partitions
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(lse - m_new)  # 0 for masked partitions
        w_sum = w_sum * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        m_run = m_new
    q_row = tl.load(query_start_loc_ptr + b).to(tl.int64)
    tl.store(
        out_ptr + q_row * stride_ot + h * stride_oh + dims,
        (acc / w_sum).to(out_ptr.dtype.element_ty),
        mask=dmask,
    )


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
    num_partitions: int,
    block_n: int = 64,
    num_warps: int = 2,
    num_stages: int = 3,
    min_partition: int = 0,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention for B requests with one query token each (query_start_loc[b] is the row
    of request b in query/out). Writes rows query_start_loc[0..B-1] of out [T, num_heads,
    head_dim] and returns out.

    num_partitions (P) only sizes the grid: any P >= 1 is correct for any seq_lens.
    min_partition: fewest keys per partition (rounded up to a multiple of block_n, at least one tile).
    alibi_slopes: [num_heads] float32 ALiBi slopes (a separate specialisation of the partition
    kernel; None compiles and runs the plain one).
    """
    num_seqs = seq_lens.shape[0]
    _, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    group = num_heads // num_kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    window = int(sliding_window) if sliding_window is not None else 0
    ieee = query.dtype == torch.float32
    min_part = max(1, -(-min_partition // block_n)) * block_n
    if num_partitions == 1:
        part_out = part_lse = out  # unused placeholders: every request is written directly
    else:
        part_out = torch.empty(
            (num_seqs, num_heads, num_partitions, head_dim), dtype=torch.float32, device=query.device
        )
        part_lse = torch.empty((num_seqs, num_heads, num_partitions), dtype=torch.float32, device=query.device)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        part_out,
        part_lse,
        alibi_slopes,
        float(scale) * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_tables.stride(0),
        window,
        num_heads,
        num_partitions,
        min_part,
        BLOCK_SIZE=key_cache.shape[1],
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_N=block_n,
        IEEE=ieee,
        ALIBI=alibi_slopes is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_partitions > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out,
            part_out,
            part_lse,
            seq_lens,
            query_start_loc,
            out.stride(0),
            out.stride(1),
            window,
            num_heads,
            num_partitions,
            min_part,
            HEAD_DIM=head_dim,
            DIM_PAD=dim_pad,
            BLOCK_N=block_n,
            P_CHUNK=min(32, triton.next_power_of_2(num_partitions)),
            num_warps=4,
        )
    return out
