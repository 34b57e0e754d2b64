"""Triton paged attention for prefill, chunked prefill and mixed prefill+decode batches.

Request i owns query rows [qsl[i], qsl[i+1]) (q_len_i = qsl[i+1] - qsl[i]) and a context of
seq_lens[i] tokens, all already in the paged cache; query j sits at absolute position
seq_lens[i] - q_len_i + j (a cached prefix precedes the chunk) and sees keys at positions <= its own.

Grid = (T // BLOCK_Q + B, num_kv_heads). Program pid serves query tile `j` of request `i` where

    S_i = qsl[i] // BLOCK_Q + i          (monotone in i, S_{i+1} - S_i >= cdiv(q_len_i, BLOCK_Q))
    i   = max{ i : S_i <= pid }  (binary search),   j = pid - S_i,   exit if j * BLOCK_Q >= q_len_i

so no host sync or metadata tensor is needed. A tile's rows are BLOCK_Q tokens x GROUP_PAD query
heads of one KV head (row r -> token r // GROUP_PAD, head kvh * GROUP + r % GROUP_PAD), so K/V
tiles are read once for the whole GQA group:

    rows (BLOCK_M = BLOCK_Q * GROUP_PAD)         keys, BLOCK_N per step, gathered through the
    t0h0 t0h1 .. t0hG t1h0 ...                   block table: pos -> (block_tables[i, pos // bs],
                                                 pos % bs)

Online softmax in float32, log2 domain. Only key tiles on the causal diagonal, at the end of the
context or at the sliding-window edge pay for per-element masks; interior tiles run unmasked.
ALiBi (ALIBI constexpr, slopes pointer): score += slope_h * (key pos - query pos), in every tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.triton.attention_decode import LOG2E, LOG2E_JIT


@triton.jit
def _attend_key_range(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    n_start,
    n_end,
    k_hi,
    bt_row,
    k_head,
    v_head,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    window,
    qk_scale,
    slope,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    K_TRANS: tl.constexpr,
    IEEE: tl.constexpr,
    ALIBI: tl.constexpr,
):
    """Online-softmax update of (acc [BLOCK_M, DIM_PAD], m_i, l_i [BLOCK_M]) with the key tiles
    starting at n_start, n_start + BLOCK_N, ... < n_end. MASKED=False is only legal for tiles
    whose keys are all < k_hi and visible to every row (no causal/window/bounds test needed).
    ALIBI: adds slope [BLOCK_M] (log2 domain) * (key pos - query pos) to the scores; with
    ALIBI=False `slope` is unused and the compiled code is the plain one."""
    dims = tl.arange(0, DIM_PAD)
    dmask = dims < HEAD_DIM
    for n0 in range(n_start, n_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute key positions
        valid = pos < k_hi
        if MASKED:
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        slot = pos % BLOCK_SIZE
        kv_rows_k = blk * stride_kb + slot * stride_ks  # [BLOCK_N] element offsets of each key row
        kv_rows_v = blk * stride_vb + slot * stride_vs
        # K tile as [DIM_PAD, BLOCK_N] (either gathered transposed, or [BLOCK_N, DIM_PAD] + trans).
        if K_TRANS:
            k_ptrs = k_head + kv_rows_k[:, None] + dims[None, :]
            if MASKED:
                k = tl.load(k_ptrs, mask=valid[:, None] & dmask[None, :], other=0.0)
            elif DIM_PAD != HEAD_DIM:
                k = tl.load(k_ptrs, mask=dmask[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs)
            k = tl.trans(k)
        else:
            k_ptrs = k_head + kv_rows_k[None, :] + dims[:, None]
            if MASKED:
                k = tl.load(k_ptrs, mask=valid[None, :] & dmask[:, None], other=0.0)
            elif DIM_PAD != HEAD_DIM:
                k = tl.load(k_ptrs, mask=dmask[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if MASKED:
            visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
            if window > 0:
                visible = visible & (pos[None, :] > q_pos[:, None] - window)
            if ALIBI:
                s = s * qk_scale + slope[:, None] * (pos[None, :] - q_pos[:, None]).to(tl.float32)
            else:
                s = s * qk_scale
            s = tl.where(visible, s, float("-inf"))  # [BLOCK_M, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row may see no key yet (window start beyond this tile): keep exponents finite.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            if ALIBI:
                s = s * qk_scale + slope[:, None] * (pos[None, :] - q_pos[:, None]).to(tl.float32)
            else:
                s = s * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = m_new  # finite: every score in the tile is
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = v_head + kv_rows_v[:, None] + dims[None, :]
        if MASKED:
            v = tl.load(v_ptrs, mask=valid[:, None] & dmask[None, :], other=0.0)
        elif DIM_PAD != HEAD_DIM:
            v = tl.load(v_ptrs, mask=dmask[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)  # [BLOCK_N, DIM_PAD]
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
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
    num_seqs,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    K_TRANS: tl.constexpr,
    IEEE: tl.constexpr,
    ALIBI: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    # Binary search for the request: largest i in [0, num_seqs) with S_i <= pid.
    lo = num_seqs * 0  # a run-time int32 (a literal 0 would be a constexpr)
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        s_mid = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        go_right = s_mid <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # absolute position of query 0 (= cached prefix length)

    r = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + r // GROUP_PAD  # [BLOCK_M] query index within the request
    g = r % GROUP_PAD
    heads = kvh * GROUP + g
    row_ok = (tok < q_len) & (g < GROUP)
    q_pos = ctx + tok  # [BLOCK_M] absolute positions
    dims = tl.arange(0, DIM_PAD)
    dmask = dims < HEAD_DIM
    qmask = row_ok[:, None] & dmask[None, :]
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=qmask,
        other=0.0,
    )
    q = q.to(k_cache_ptr.dtype.element_ty)  # [BLOCK_M, DIM_PAD]

    # Valid rows have positions [p_first, k_hi); they need keys [k_lo, k_hi). Key tiles split in
    #   [tile_lo, full_lo)  masked   (sliding-window lower edge; empty without a window)
    #   [full_lo, full_hi)  unmasked (every key visible to every row: <= p_first, inside window)
    #   [full_hi, k_hi)     masked   (causal diagonal and the end of the context)
    p_first = ctx + tile * BLOCK_Q
    k_hi = ctx + tl.minimum((tile + 1) * BLOCK_Q, q_len)
    k_lo = 0
    full_lo = 0
    if window > 0:
        k_lo = tl.maximum(p_first - window + 1, 0)
        full_lo = tl.cdiv(tl.maximum(k_hi - window, 0), BLOCK_N) * BLOCK_N
    tile_lo = (k_lo // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(full_lo, tile_lo)
    full_hi = tl.maximum(((p_first + 1) // BLOCK_N) * BLOCK_N, full_lo)

    if ALIBI:  # [BLOCK_M] slope of each row's head, in the log2 domain of the scores
        slope = tl.load(alibi_ptr + heads, mask=row_ok, other=0.0) * LOG2E_JIT
    else:
        slope = qk_scale  # placeholder, never read
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, q_pos, tile_lo, full_lo, k_hi, bt_row, k_head, v_head,
        stride_kb, stride_ks, stride_vb, stride_vs, window, qk_scale, slope,
        BLOCK_SIZE, BLOCK_N, HEAD_DIM, DIM_PAD, True, K_TRANS, IEEE, ALIBI,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, q_pos, full_lo, full_hi, k_hi, bt_row, k_head, v_head,
        stride_kb, stride_ks, stride_vb, stride_vs, window, qk_scale, slope,
        BLOCK_SIZE, BLOCK_N, HEAD_DIM, DIM_PAD, False, K_TRANS, IEEE, ALIBI,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, q_pos, full_hi, k_hi, k_hi, bt_row, k_head, v_head,
        stride_kb, stride_ks, stride_vb, stride_vs, window, qk_scale, slope,
        BLOCK_SIZE, BLOCK_N, HEAD_DIM, DIM_PAD, True, K_TRANS, IEEE, ALIBI,
    )  # fmt: skip

    # Every valid row saw at least its own position, so l_i > 0 there.
    o = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=qmask,
    )


def paged_prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    k_trans: bool = False,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Variable-length causal attention over the paged cache; writes out [T, num_heads, head_dim].

    block_m is the target number of rows (tokens x GQA heads) per tile; it is rounded to a multiple
    of the padded group size. alibi_slopes: [num_heads] float32 ALiBi slopes (a separate
    specialisation of the kernel; None compiles and runs the plain one).
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, block_m // group_pad)
    rows = max(16, block_q * group_pad)  # tl.dot needs M >= 16
    block_q = rows // group_pad
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
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
        int(sliding_window) if sliding_window is not None else 0,
        num_seqs,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_M=rows,
        BLOCK_N=block_n,
        BLOCK_SIZE=key_cache.shape[1],
        HEAD_DIM=head_dim,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        K_TRANS=k_trans,
        IEEE=query.dtype == torch.float32,
        ALIBI=alibi_slopes is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
