"""Triton kernels of the weight-only int4/int8 decode path (the dispatcher is triton/wna16.py).

    _gemv_kernel      y[M, N] = x[M, K] @ W[K, N] for M <= 16, dequantizing on the fly, with the
                      optional RMSNorm(+residual) prologue, bias and SiLU-and-mul epilogue; split-K
                      writes float32 partials that _splitk_reduce_kernel sums (and finishes)
    _prologue_kernel  x' = gather(perm, rms_norm(x [+ residual]) * norm_weight): act-order and the
                      GEMM path's norm, once per call (one program per row)

The weight layout (wna16.PreparedWNA16): qweight int32 [NR, K / PF], K contiguous, word j of row n
holds q[PF*j + i, n] in bits [BITS*i, BITS*(i+1)) (PF = 32 // BITS); scales / zeros [NR, G].

    one K step (BLOCK_K = NC * PF) of one program, BLOCK_N rows:
        words  [BN, NC]           word c of the step along the lanes (a warp reads 128 B per row)
        x      [M_PAD, NC, PF]    value i of word c is k = k0 + PF*c + i (16 contiguous bytes per
                                  bf16 thread), split in registers into PF [M_PAD, NC] tensors
    A word never straddles a quantization group (PF divides group_size), so the scale and zero
    factor out of its sum:
        sum_i x*(q - z)*s = s * (sum_i x*q - z * sum_i x)
    which leaves one FMA per weight element and token after the unpack (one AND keeping the
    value in place under a float exponent, and one FADD: (v | 0x4B000000) read as float is
    2**23 + v; see _value). sm_90 SASS of a BN 8 step (64 values per thread): 64 LOP3 + 64 FADD +
    72 FFMA of ~375 instructions.
    sum_i x is shared by all BN rows. The accumulator acc [M_PAD, BN, NC] is summed over NC once,
    after the loop. (Words of 16 bytes per thread would read better, but Triton then spreads a
    thread's 32 int4 values and their 64 bytes of x over lanes and shuffles them through shared
    memory: one word per thread keeps x, q and the accumulator in one layout.)

Zero points are real numbers (any float), scales any float dtype: the math is float32 throughout.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _value(w_lo, w_hi, IDX: tl.constexpr, BITS: tl.constexpr):
    """Value IDX of each word as float32 v * 2**(BITS * (IDX % HALF)), exactly (HALF = PF / 2).

    w_lo / w_hi: the word's low / high 16 bits with 0x4B000000 above them (_word_dot). One AND
    with one immediate keeps value IDX's bits in place under the exponent, giving the float
    2**23 + v * 2**(BITS * (IDX % HALF)); the power of two is taken off x instead (_x_unscale)."""
    HALF: tl.constexpr = 16 // BITS
    KEEP: tl.constexpr = (((1 << BITS) - 1) << ((IDX % HALF) * BITS)) - 16777216  # | 0xFF000000, as int32
    src = w_hi if IDX >= HALF else w_lo
    return (src & KEEP).to(tl.float32, bitcast=True) - 8388608.0  # (2**23 + v) - 2**23, v < 2**16


@triton.jit
def _word_dot(xs, wq, magic, BITS: tl.constexpr, M_PAD: tl.constexpr, BN: tl.constexpr,
              NC: tl.constexpr):
    """sum_i xs[..., i] * value i, per word: xs [M_PAD, 1, NC, PF] (x * _x_unscale), wq [BN, NC]
    -> [M_PAD, BN, NC]. x is split into its PF values (tl.split of in-thread pairs: no data
    movement) so the sum is one FMA chain; a tl.sum over PF would be a tree of FMUL + FADD.
    magic = 0x4B000000 arrives as a run-time argument: as a constant, LLVM folds it into every
    value's AND (two immediates per LOP3: a register move per value)."""
    w = tl.reshape(wq, [1, BN, NC])
    w_lo = (w & 0xFFFF) | magic
    w_hi = ((w >> 16) & 0xFFFF) | magic
    if BITS == 4:
        e, o = tl.split(tl.reshape(xs, [M_PAD, 1, NC, 4, 2]))  # values 0 2 4 6 | 1 3 5 7
        e0, e1 = tl.split(tl.reshape(e, [M_PAD, 1, NC, 2, 2]))  # 0 4 | 2 6
        o0, o1 = tl.split(tl.reshape(o, [M_PAD, 1, NC, 2, 2]))  # 1 5 | 3 7
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        dq = x0 * _value(w_lo, w_hi, 0, BITS)
        dq += x1 * _value(w_lo, w_hi, 1, BITS)
        dq += x2 * _value(w_lo, w_hi, 2, BITS)
        dq += x3 * _value(w_lo, w_hi, 3, BITS)
        dq += x4 * _value(w_lo, w_hi, 4, BITS)
        dq += x5 * _value(w_lo, w_hi, 5, BITS)
        dq += x6 * _value(w_lo, w_hi, 6, BITS)
        dq += x7 * _value(w_lo, w_hi, 7, BITS)
    else:
        e, o = tl.split(tl.reshape(xs, [M_PAD, 1, NC, 2, 2]))  # values 0 2 | 1 3
        x0, x2 = tl.split(e)
        x1, x3 = tl.split(o)
        dq = x0 * _value(w_lo, w_hi, 0, BITS)
        dq += x1 * _value(w_lo, w_hi, 1, BITS)
        dq += x2 * _value(w_lo, w_hi, 2, BITS)
        dq += x3 * _value(w_lo, w_hi, 3, BITS)
    return dq


@triton.jit
def _x_unscale(BITS: tl.constexpr):
    """[PF] float32 2**-(BITS * (i % HALF)) for value i of a word (see _value)."""
    PF: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PF // 2
    e = (tl.arange(0, PF) % HALF) * BITS
    return ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, res_out_ptr,
    M, N, K, G, k_split,  # N: result columns (I when gated: the up rows start at row N)
    stride_x, stride_res, stride_w, stride_s, stride_out, stride_res_out,
    eps, magic,  # magic: 0x4B000000 (see _word_dot)
    BITS: tl.constexpr, GROUP: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    GATED: tl.constexpr, SPLIT: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), splits); split s covers K range [s*k_split, (s+1)*k_split).
    SPLIT: out_ptr is float32 [splits, M, NR] partials (no bias / gate), else [M, N] in x's dtype."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    PF: tl.constexpr = 32 // BITS
    NC: tl.constexpr = BLOCK_K // PF
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Padded rows / columns re-read the last valid one instead of masking the hot loads; they
    # are never stored.
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    nc = tl.arange(0, NC)
    kx = nc[:, None] * PF + tl.arange(0, PF)[None, :]  # [NC, PF] k offsets within a step
    x_ptrs = x_ptr + rows_m[:, None, None] * stride_x + kx[None, :, :]  # [M_PAD, NC, PF]
    r_ptrs = res_ptr + rows_m[:, None, None] * stride_res + kx[None, :, :]
    # One word per thread (max_contiguous 1): otherwise the load would take 2-4 adjacent words per
    # thread, a layout that neither x nor the accumulator has, and be shuffled every step.
    w_ptrs = w_ptr + rows_n[:, None] * stride_w + tl.max_contiguous(nc, 1)[None, :]  # [BN, NC]
    u_ptrs = w_ptrs + N * stride_w  # up rows (GATED only)
    s_ptrs = s_ptr + rows_n[:, None] * stride_s  # [BN, 1], + group index [1, NC]
    z_ptrs = z_ptr + rows_n[:, None] * stride_s
    u_off = N * stride_s
    unscale = _x_unscale(BITS)[None, None, :]  # [1, 1, PF]
    k_lo = pid_s * k_split
    k_hi = tl.minimum(k_lo + k_split, K)

    if HAS_NORM:
        # Pass 1 over all of K (every split needs the whole row's statistics): per-row sum of
        # squares of s = x (+ residual), s rounded to dtype first, as reference.rms_norm.
        kk = tl.arange(0, NORM_BLOCK)[None, :]
        ss = tl.zeros([M_PAD, NORM_BLOCK], dtype=tl.float32)
        for k0 in range(0, K, NORM_BLOCK):
            kmask = (k0 + kk) < K
            s = tl.load(x_ptr + rows_m[:, None] * stride_x + k0 + kk, mask=kmask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + rows_m[:, None] * stride_res + k0 + kk, mask=kmask, other=0.0)
                s = (s.to(tl.float32) + r.to(tl.float32)).to(dtype)
                # Program (0, 0) alone writes the new residual (a separate buffer: others read x).
                writer_rows = tl.where((pid_n == 0) & (pid_s == 0), M, 0)
                smask = kmask & (offs_m[:, None] < writer_rows)
                tl.store(res_out_ptr + offs_m[:, None] * stride_res_out + k0 + kk, s, mask=smask)
            sf = s.to(tl.float32)
            ss += sf * sf
        rstd = tl.rsqrt(tl.sum(ss, axis=1) / K + eps)[:, None, None]  # [M_PAD, 1, 1]

    acc = tl.zeros([M_PAD, BLOCK_N, NC], dtype=tl.float32)
    acc_u = tl.zeros([M_PAD, BLOCK_N, NC], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cmask = (k0 + nc * PF) < k_hi  # [NC]: whole words are in or out (PF divides K)
        a = tl.load(x_ptrs + k0, mask=cmask[None, :, None], other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptrs + k0, mask=cmask[None, :, None], other=0.0)
            a = (a.to(tl.float32) + r.to(tl.float32)).to(dtype)
        if HAS_NORM:
            # (s * rstd) -> dtype, * norm_weight -> dtype: reference.rms_norm's two roundings.
            nw = tl.load(nw_ptr + k0 + kx, mask=cmask[:, None], other=0.0)[None, :, :]
            a = (a.to(tl.float32) * rstd).to(dtype)
            a = (a.to(tl.float32) * nw.to(tl.float32)).to(dtype)
        af = a.to(tl.float32)
        # (unit dims through tl.reshape, not [None]: a reshape keeps the operand's layout, so x,
        # q and the accumulator stay in one layout and nothing goes through shared memory)
        sx = tl.reshape(tl.sum(af, axis=2), [M_PAD, 1, NC])
        af = tl.reshape(af * unscale, [M_PAD, 1, NC, PF])  # exact (powers of two)
        grp = tl.minimum((k0 + nc * PF) // GROUP, G - 1)[None, :]  # [1, NC]
        wmask = cmask[None, :]
        dq = _word_dot(af, tl.load(w_ptrs + k0 // PF, mask=wmask, other=0), magic, BITS, M_PAD, BLOCK_N, NC)
        sc = tl.reshape(tl.load(s_ptrs + grp).to(tl.float32), [1, BLOCK_N, NC])
        zc = tl.reshape(tl.load(z_ptrs + grp).to(tl.float32), [1, BLOCK_N, NC])
        acc += sc * (dq - zc * sx)
        if GATED:
            du = _word_dot(af, tl.load(u_ptrs + k0 // PF, mask=wmask, other=0), magic, BITS, M_PAD,
                           BLOCK_N, NC)
            su = tl.reshape(tl.load(s_ptrs + u_off + grp).to(tl.float32), [1, BLOCK_N, NC])
            zu = tl.reshape(tl.load(z_ptrs + u_off + grp).to(tl.float32), [1, BLOCK_N, NC])
            acc_u += su * (du - zu * sx)
    y = tl.sum(acc, axis=2)  # [M_PAD, BN]
    omask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT:
        # partials [splits, M, NR]: gate (or plain) columns at n, up columns at N + n
        p_ptrs = out_ptr + (pid_s * M + offs_m[:, None]) * stride_out + offs_n[None, :]
        tl.store(p_ptrs, y, mask=omask)
        if GATED:
            tl.store(p_ptrs + N, tl.sum(acc_u, axis=2), mask=omask)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + rows_n)[None, :].to(tl.float32)
        if GATED:
            up = tl.sum(acc_u, axis=2)
            if HAS_BIAS:
                up += tl.load(b_ptr + N + rows_n)[None, :].to(tl.float32)
            y = y / (1.0 + tl.exp(-y)) * up  # silu(gate) * up in float32, rounded once below
        tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], y.to(dtype), mask=omask)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, b_ptr, out_ptr, M, N, stride_part, stride_out,
    SPLITS: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
):
    """Grid (M, cdiv(N, BLOCK)): out[m, n] = epilogue(sum_s part[s, m, n]) in a fixed order (the
    result does not depend on scheduling)."""
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    y = tl.zeros([BLOCK], dtype=tl.float32)
    up = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        row = part_ptr + (s * M + m) * stride_part
        y += tl.load(row + offs, mask=mask, other=0.0)
        if GATED:
            up += tl.load(row + N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            up += tl.load(b_ptr + N + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        y = y / (1.0 + tl.exp(-y)) * up
    tl.store(out_ptr + m * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prologue_kernel(
    x_ptr, res_ptr, nw_ptr, perm_ptr, xo_ptr, res_out_ptr,
    K, stride_x, stride_res, stride_xo, stride_res_out, eps,
    BLOCK: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_PERM: tl.constexpr,
):
    """Grid (M,): xo[m, j] = h[m, perm[j]] (perm: identity when absent), where h is
    rms_norm(x [+ residual]) * norm_weight with HAS_NORM (reference rounding) and x otherwise;
    res_out = x + residual (rounded to dtype) with HAS_RESIDUAL. The statistics are permutation
    invariant, so they are taken in the original order; the gathered loads are L2-resident."""
    m = tl.program_id(0).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + m * stride_x
    r_row = res_ptr + m * stride_res
    if HAS_NORM:
        ss = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            kmask = (k0 + offs) < K
            s = tl.load(x_row + k0 + offs, mask=kmask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(r_row + k0 + offs, mask=kmask, other=0.0)
                s = (s.to(tl.float32) + r.to(tl.float32)).to(dtype)
                tl.store(res_out_ptr + m * stride_res_out + k0 + offs, s, mask=kmask)
            sf = s.to(tl.float32)
            ss += sf * sf
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    for k0 in range(0, K, BLOCK):
        kmask = (k0 + offs) < K
        if HAS_PERM:
            idx = tl.load(perm_ptr + k0 + offs, mask=kmask, other=0)
        else:
            idx = k0 + offs
        a = tl.load(x_row + idx, mask=kmask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_row + idx, mask=kmask, other=0.0)
            a = (a.to(tl.float32) + r.to(tl.float32)).to(dtype)
        if HAS_NORM:
            g = tl.load(nw_ptr + idx, mask=kmask, other=0.0)
            a = (a.to(tl.float32) * rstd).to(dtype)
            a = (a.to(tl.float32) * g.to(tl.float32)).to(dtype)
        tl.store(xo_ptr + m * stride_xo + k0 + offs, a, mask=kmask)
