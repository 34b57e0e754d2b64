"""Triton dequantizing GEMM of the weight-only int4/int8 path for larger token counts (the
dispatcher is triton/wna16.py): y[M, N] = x[M, K] @ W[K, N] (+ bias), optional SiLU-and-mul.

Per K step each program unpacks a [BK, BN] weight tile in registers, dequantizes it exactly as
the twin does, w = ((q - z) * s) rounded to x's dtype, and feeds it to tl.dot (tensor cores,
float32 accumulate; float32 models use input_precision="ieee", not TF32):

    qweight int32 [NR, K / PF] (K contiguous)        tile loaded as words [BK / PF, BN]
        words [BK/PF, BN] -> q [BK/PF, PF, BN] -> [BK, BN]     row PF*j + i = value i of word j
    scales / zeros [NR, G]: BK divides group_size, so a step uses one group: vectors [BN]

FACTORED (int4, bf16 models, small BLOCK_M: the decode sizes, where the dequantization is the cost):
the tile goes to tl.dot undequantized, as 128 + q (bf16 0x4300 | q is exactly 128 + q), and
scale and zero point are applied to the step's partial product, one group per step:

    sum_k x (q - z) s = s * (dot(x, 128 + q) - (z + 128) * sum_k x)

which leaves a shift, a mask and a narrowing move per element (about half the instructions of
the exact path). The offset costs ~4 of float32's 24 bits in the per-group partial (far below the
bf16 output's 8); the result differs from the twin's by the twin's own bf16 rounding of w.

The norm prologue and act-order are done before (wna16_gemv._prologue_kernel): here K is in
the stored order and x is the (normalised, permuted) activation.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dequant_tile(w_ptrs, s_ptrs, z_ptrs, k0, dtype, BITS: tl.constexpr, GROUP: tl.constexpr,
                  BK: tl.constexpr, BN: tl.constexpr):
    """The [BK, BN] tile of W at K offset k0, in dtype (the twin's rounding)."""
    PF: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PF) * BITS
    wq = tl.load(w_ptrs + k0 // PF)  # [BK / PF, BN] int32
    q = (wq[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BK / PF, PF, BN]
    q = tl.reshape(q, [BK, BN])
    qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exact int -> float
    g = k0 // GROUP
    s = tl.load(s_ptrs + g).to(tl.float32)[None, :]
    z = tl.load(z_ptrs + g).to(tl.float32)[None, :]
    return ((qf - z) * s).to(dtype)


@triton.jit
def _exact_step(acc, a, w_ptrs, s_ptrs, z_ptrs, k0, dtype, BITS: tl.constexpr, GROUP: tl.constexpr,
                BK: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """acc + dot(a, w) with w dequantized as the twin does."""
    w = _dequant_tile(w_ptrs, s_ptrs, z_ptrs, k0, dtype, BITS, GROUP, BK, BN)
    if IEEE:
        return tl.dot(a, w, acc, input_precision="ieee")
    return tl.dot(a, w, acc)


@triton.jit
def _offset_tile_bf16(w_ptrs, k0, BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """The [BK, BN] int4 tile at K offset k0 as bf16 128 + q, exactly (FACTORED)."""
    PF: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PF) * BITS
    wq = tl.load(w_ptrs + k0 // PF)  # [BK / PF, BN] int32
    q = ((wq[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)) | 0x4300
    return tl.reshape(q.to(tl.int16), [BK, BN]).to(tl.bfloat16, bitcast=True)


@triton.jit
def _factored_step(acc, a, sx, w_ptrs, s_ptrs, z_ptrs, k0, BITS: tl.constexpr, GROUP: tl.constexpr,
                   BK: tl.constexpr, BN: tl.constexpr):
    """acc + s * (dot(a, 128 + q) - (z + 128) * sum_k a) for one in-group K step."""
    part = tl.dot(a, _offset_tile_bf16(w_ptrs, k0, BITS, BK, BN))
    g = k0 // GROUP
    s = tl.load(s_ptrs + g).to(tl.float32)[None, :]
    z = tl.load(z_ptrs + g).to(tl.float32)[None, :] + 128.0
    return acc + s * (part - z * sx)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K,  # N: result columns (I when gated: the up rows start at weight row N)
    stride_x, stride_w, stride_s, stride_out,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    IEEE: tl.constexpr, FACTORED: tl.constexpr,
):
    """Grid (cdiv(M, BM) * cdiv(N, BN),), grouped so GROUP_M row blocks share a weight column
    block while it is in L2. K % BLOCK_K == 0 (BLOCK_K divides group_size, which divides K)."""
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    PF: tl.constexpr = 32 // BITS
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)  # padding re-reads a valid row, never stored
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_ptrs = x_ptr + rows_m[:, None] * stride_x + tl.arange(0, BLOCK_K)[None, :]  # [BM, BK]
    w_ptrs = w_ptr + rows_n[None, :] * stride_w + tl.arange(0, BLOCK_K // PF)[:, None]  # [BK/PF, BN]
    s_ptrs = s_ptr + rows_n * stride_s  # [BN] (+ group)
    z_ptrs = z_ptr + rows_n * stride_s
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u_off_w = N * stride_w  # the up rows (GATED)
    u_off_s = N * stride_s
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs + k0)
        if FACTORED:
            sx = tl.sum(a.to(tl.float32), axis=1)[:, None]  # [BM, 1]
            acc = _factored_step(acc, a, sx, w_ptrs, s_ptrs, z_ptrs, k0, BITS, GROUP, BLOCK_K, BLOCK_N)
            if GATED:
                acc_u = _factored_step(acc_u, a, sx, w_ptrs + u_off_w, s_ptrs + u_off_s, z_ptrs + u_off_s,
                                       k0, BITS, GROUP, BLOCK_K, BLOCK_N)
        else:
            acc = _exact_step(acc, a, w_ptrs, s_ptrs, z_ptrs, k0, dtype, BITS, GROUP, BLOCK_K, BLOCK_N, IEEE)
            if GATED:
                acc_u = _exact_step(acc_u, a, w_ptrs + u_off_w, s_ptrs + u_off_s, z_ptrs + u_off_s, k0,
                                    dtype, BITS, GROUP, BLOCK_K, BLOCK_N, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n)[None, :].to(tl.float32)
    if GATED:
        if HAS_BIAS:
            acc_u += tl.load(b_ptr + N + rows_n)[None, :].to(tl.float32)
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    omask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(dtype), mask=omask)
