"""FROZEN COPY of the decode attention path as it was before the fused rotary + KV write and the
device-side partition split (commit 61fcaf1): kernels/triton/attention_decode.py verbatim, plus the
old dispatcher's decode branch (zeros memset + static partition choice). Used only by
benchmarks/attention_bench.py as the "old" column; not part of the engine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


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
    part_m_ptr,
    part_l_ptr,
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
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    PARTITION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    part_start = part * PARTITION
    # Keys visible to the (single) query at position seq_len - 1: [win_lo, seq_len).
    win_lo = 0
    if window > 0:
        win_lo = tl.maximum(seq_len - window, 0)
    lo = tl.maximum(part_start, win_lo)
    hi = tl.minimum(seq_len, part_start + PARTITION)
    if lo >= hi:
        return
    tile_lo = part_start + ((lo - part_start) // BLOCK_N) * BLOCK_N

    g = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + g  # [GROUP_PAD]
    dims = tl.arange(0, DIM_PAD)
    dmask = dims < HEAD_DIM
    qmask = (g < GROUP)[:, None] & dmask[None, :]
    q_row = tl.load(query_start_loc_ptr + b).to(tl.int64)
    q = tl.load(q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=qmask, other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)  # [GROUP_PAD, DIM_PAD]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh
    # Every tile holds at least one key in [lo, hi), so m_i is finite after the first tile.
    for n0 in range(tile_lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute key positions
        valid = (pos >= lo) & (pos < hi)
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        kv_mask = valid[None, :] & dmask[:, None]
        k = tl.load(
            k_head + blk[None, :] * stride_kb + slot[None, :] * stride_ks + dims[:, None],
            mask=kv_mask,
            other=0.0,
        )  # [DIM_PAD, BLOCK_N]
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # [GROUP_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_head + blk[:, None] * stride_vb + slot[:, None] * stride_vs + dims[None, :],
            mask=valid[:, None] & dmask[None, :],
            other=0.0,
        )  # [BLOCK_N, DIM_PAD]
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if DIRECT:
        o = acc / l_i[:, None]
        tl.store(
            out_ptr + q_row * stride_ot + heads[:, None] * stride_oh + dims[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=qmask,
        )
    else:
        # part_* are contiguous: m/l [B, num_heads, P], out [B, num_heads, P, HEAD_DIM].
        idx = (b.to(tl.int64) * num_heads + heads) * num_partitions + part  # [GROUP_PAD]
        gmask = g < GROUP
        tl.store(part_m_ptr + idx, m_i, mask=gmask)
        tl.store(part_l_ptr + idx, l_i, mask=gmask)
        tl.store(part_out_ptr + idx[:, None] * HEAD_DIM + dims[None, :], acc, mask=qmask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_m_ptr,
    part_l_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    stride_ot,
    stride_oh,
    window,
    num_heads,
    num_partitions,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    PARTITION: tl.constexpr,
    P_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    win_lo = 0
    if window > 0:
        win_lo = tl.maximum(seq_len - window, 0)
    # Exactly the partitions in [first, last) wrote partial results (see the partition kernel).
    first = win_lo // PARTITION
    last = tl.cdiv(seq_len, PARTITION)
    base = (b.to(tl.int64) * num_heads + h) * num_partitions
    ps = tl.arange(0, P_PAD)
    pmask = (ps >= first) & (ps < last)
    m = tl.load(part_m_ptr + base + ps, mask=pmask, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    l_part = tl.load(part_l_ptr + base + ps, mask=pmask, other=0.0)
    w = tl.where(pmask, tl.exp2(m - m_max), 0.0)
    l_tot = tl.sum(w * l_part, axis=0)

    dims = tl.arange(0, DIM_PAD)
    dmask = dims < HEAD_DIM
    acc = tl.zeros([DIM_PAD], dtype=tl.float32)
    for p in range(first, last):
        wp = tl.exp2(tl.load(part_m_ptr + base + p) - m_max)
        acc += wp * tl.load(part_out_ptr + (base + p) * HEAD_DIM + dims, mask=dmask, other=0.0)
    # l_tot == 0 only for an empty context (seq_len 0, e.g. a padded batch slot): write zeros.
    inv = tl.where(l_tot > 0.0, 1.0 / tl.maximum(l_tot, 1e-30), 0.0)
    q_row = tl.load(query_start_loc_ptr + b).to(tl.int64)
    tl.store(
        out_ptr + q_row * stride_ot + h * stride_oh + dims,
        (acc * inv).to(out_ptr.dtype.element_ty),
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
    max_seq_len: int,
    partition_size: int = 512,
    block_n: int = 64,
    num_warps: int = 2,
    num_stages: int = 3,
) -> torch.Tensor:
    """Decode attention for B requests with one query token each (query_start_loc[b] is the row
    of request b in query/out). Writes out [T, num_heads, head_dim] and returns it.

    max_seq_len only sizes the grid: any upper bound of seq_lens is correct.
    """
    num_seqs = seq_lens.shape[0]
    _, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    if partition_size % block_n != 0:
        raise ValueError(f"partition_size ({partition_size}) must be a multiple of block_n ({block_n})")
    group = num_heads // num_kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    num_parts = max(1, triton.cdiv(max_seq_len, partition_size))
    direct = num_parts == 1
    window = int(sliding_window) if sliding_window is not None else 0
    ieee = query.dtype == torch.float32
    if direct:
        part_out = part_m = part_l = out  # unused placeholders
    else:
        part_out = torch.empty(
            (num_seqs, num_heads, num_parts, head_dim), dtype=torch.float32, device=query.device
        )
        part_m = torch.empty((num_seqs, num_heads, num_parts), dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_parts)](
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        part_out,
        part_m,
        part_l,
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
        num_parts,
        BLOCK_SIZE=key_cache.shape[1],
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        PARTITION=partition_size,
        BLOCK_N=block_n,
        DIRECT=direct,
        IEEE=ieee,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not direct:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out,
            part_out,
            part_m,
            part_l,
            seq_lens,
            query_start_loc,
            out.stride(0),
            out.stride(1),
            window,
            num_heads,
            num_parts,
            HEAD_DIM=head_dim,
            DIM_PAD=dim_pad,
            PARTITION=partition_size,
            P_PAD=triton.next_power_of_2(num_parts),
            num_warps=4,
        )
    return out


_OLD_PARTITIONS = (1024, 512, 256, 128)


def old_paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    """The old paged_attention decode branch with default tuning: zeros output, static partition
    (largest of 1024..128 giving >= 4 x SMs programs), block_n 64, 2 warps, 3 stages."""
    out = torch.zeros_like(query)
    num_seqs, kvh = seq_lens.shape[0], key_cache.shape[2]
    target = 4 * torch.cuda.get_device_properties(query.device).multi_processor_count
    part = _OLD_PARTITIONS[-1]
    for p in _OLD_PARTITIONS:
        if num_seqs * kvh * -(-max_seq_len // p) >= target:
            part = p
            break
    return paged_decode_attention(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, None, out,
        max_seq_len, partition_size=part, block_n=64, num_warps=2, num_stages=3,
    )  # fmt: skip
