"""Triton kernels for GGUF weights kept as raw blocks (twin: reference_gguf.gguf_matmul; the
block layouts are drawn there).

    gguf_matmul(x [M, K], GGUFWeight(data uint8 [N, K/B*S], qtype, K), bias) -> y [M, N]
      M <= MAX_M  one fused kernel per block type (QTYPE constexpr): a program owns BLOCK_N
                  output rows of the weight and walks K; each step decodes a [BLOCK_N, BLOCK_K]
                  tile of values in registers straight from the blocks and does
                  acc [M_PAD, BN] += x tile [M_PAD, BK] @ tile^T (tl.dot, float32 accumulate;
                  IEEE precision for float32 models). The weight bytes are read once.
      M > MAX_M   gguf_dequantize -> W [N, K] in x's dtype, then F.linear (cuBLAS)

Decoding a tile: value (n, k) lives in block b = k // B of row n, at byte base = n * row_stride
+ b * S; `_tile` computes each value's byte(s) and shift from (k % B) by the formulas of
reference_gguf, so a tile may start and end anywhere (BLOCK_K need not be a multiple of B).
float16 fields (d, m, dmin) are read through a float16 view of the same bytes at base / 2 + i
(block starts are even: S and the row stride are even). The scale bytes a tile re-reads for each
of its values are a handful per block and come from L1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pagedserve.kernels.reference_gguf import GGUF_BLOCKS, GGUFWeight, row_bytes

__all__ = ["MAX_M", "gguf_dequantize", "gguf_gemv", "gguf_matmul"]

MAX_M = 16  # tokens up to which the fused kernel runs (tl.dot needs M_PAD >= 16 anyway)
_BLOCK_N, _BLOCK_K = 32, 128
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _byte(u8_ptr, offs, mask):
    return tl.load(u8_ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _half(f16_ptr, byte_offs, mask):
    return tl.load(f16_ptr + byte_offs // 2, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile(u8_ptr, f16_ptr, rows, offs_k, stride_row, mask, QTYPE: tl.constexpr):
    """float32 [BN, BK]: the values (rows [BN] int64, offs_k [BK]) of a QTYPE weight, computed in
    the order of reference_gguf (and gguf.quants)."""
    if QTYPE == 2:  # Q4_0: d | qs[16]
        j = (offs_k % 32)[None, :]
        base = rows[:, None] * stride_row + ((offs_k // 32) * 18)[None, :]
        nib = (_byte(u8_ptr, base + 2 + j % 16, mask) >> (4 * (j // 16))) & 15
        return _half(f16_ptr, base, mask) * (nib - 8).to(tl.float32)
    elif QTYPE == 3:  # Q4_1: d | m | qs[16]
        j = (offs_k % 32)[None, :]
        base = rows[:, None] * stride_row + ((offs_k // 32) * 20)[None, :]
        nib = (_byte(u8_ptr, base + 4 + j % 16, mask) >> (4 * (j // 16))) & 15
        return _half(f16_ptr, base, mask) * nib.to(tl.float32) + _half(f16_ptr, base + 2, mask)
    elif QTYPE == 8:  # Q8_0: d | qs[32] int8
        j = (offs_k % 32)[None, :]
        base = rows[:, None] * stride_row + ((offs_k // 32) * 34)[None, :]
        q = tl.load(u8_ptr + base + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True)
        return q.to(tl.float32) * _half(f16_ptr, base, mask)
    elif QTYPE == 12:  # Q4_K: 256 values, 8 sub-blocks s of 32 with 6-bit scale / min
        j = (offs_k % 256)[None, :]
        base = rows[:, None] * stride_row + ((offs_k // 256) * 144)[None, :]
        s = j // 32
        p = _byte(u8_ptr, base + 4 + s, mask)  # scales[s]
        q4 = _byte(u8_ptr, base + 8 + s, mask)  # scales[s + 4]
        r = _byte(u8_ptr, base + 4 + tl.where(s >= 4, s - 4, s), mask)  # scales[s - 4]
        sc = tl.where(s < 4, p & 63, (q4 & 15) | ((r >> 6) << 4))
        mn = tl.where(s < 4, q4 & 63, (q4 >> 4) | ((p >> 6) << 4))
        q = (_byte(u8_ptr, base + 16 + 32 * (s // 2) + j % 32, mask) >> (4 * (s % 2))) & 15
        d = _half(f16_ptr, base, mask) * sc.to(tl.float32)
        dm = _half(f16_ptr, base + 2, mask) * mn.to(tl.float32)
        return d * q.to(tl.float32) - dm
    else:  # QTYPE == 14, Q6_K: 256 values, ql | qh | int8 scales per 16 | d
        j = (offs_k % 256)[None, :]
        base = rows[:, None] * stride_row + ((offs_k // 256) * 210)[None, :]
        h = j // 128
        rr = j % 128
        lo = (_byte(u8_ptr, base + 64 * h + rr % 64, mask) >> (4 * (rr // 64))) & 15
        hi = (_byte(u8_ptr, base + 128 + 32 * h + rr % 32, mask) >> (2 * (rr // 32))) & 3
        q = (lo | (hi << 4)) - 32
        sc = tl.load(u8_ptr + base + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
        d = _half(f16_ptr, base + 208, mask) * sc.to(tl.float32)
        return d * q.to(tl.float32)


@triton.jit
def _gguf_gemv_kernel(x_ptr, u8_ptr, f16_ptr, b_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_out,
                      M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = _tile(u8_ptr, f16_ptr, rows, offs_k, stride_w, n_mask[:, None] & k_mask[None, :], QTYPE)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & k_mask[None, :], other=0.0)
        wt = tl.trans(w.to(dtype))  # [BK, BN], rounded to the model dtype as the twin does
        if IEEE:
            acc += tl.dot(x, wt, input_precision="ieee")
        else:
            acc += tl.dot(x, wt)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(dtype),
             mask=(offs_m[:, None] < M) & n_mask[None, :])


@triton.jit
def _gguf_dequant_kernel(u8_ptr, f16_ptr, out_ptr, N, K, stride_w, QTYPE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N, K] in its dtype = the decoded values, one [BN, BK] tile per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = _tile(u8_ptr, f16_ptr, offs_n.to(tl.int64), offs_k, stride_w, mask, QTYPE)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask)


def _views(w: GGUFWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 rows, the same bytes as float16, row stride in bytes), after checking the layout."""
    if w.qtype not in GGUF_BLOCKS:
        raise ValueError(f"GGUF type {w.qtype!r} has no kernel; kept types: {', '.join(GGUF_BLOCKS)}")
    data = w.data
    width = row_bytes(w.qtype, w.in_features)
    if data.dim() != 2 or data.dtype != torch.uint8 or data.shape[1] != width or data.stride(1) != 1 \
            or data.stride(0) % 2:
        raise ValueError(f"{w.qtype} weight data must be uint8 [N, {width}] with contiguous, even-strided "
                         f"rows, got {tuple(data.shape)} {data.dtype} strides {data.stride()}")
    return data, data.view(torch.float16), data.stride(0)


def gguf_dequantize(w: GGUFWeight, dtype: torch.dtype, block_n: int = 32, block_k: int = 256) -> torch.Tensor:
    """W [N, K] in `dtype` (reference_gguf.dequantize_gguf, then .to(dtype))."""
    data, half, stride = _views(w)
    n, k = w.out_features, w.in_features
    out = torch.empty((n, k), dtype=dtype, device=data.device)
    _gguf_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        data, half, out, n, k, stride, QTYPE=GGUF_BLOCKS[w.qtype][0], BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def gguf_gemv(x: torch.Tensor, w: GGUFWeight, bias: torch.Tensor | None = None, *,
              block_n: int = _BLOCK_N, block_k: int = _BLOCK_K) -> torch.Tensor:
    """The fused kernel: x [M, K] (1 <= M <= MAX_M, contiguous K) -> y [M, N] in x's dtype."""
    data, half, stride = _views(w)
    n, k = w.out_features, w.in_features
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be [M, {k}] with 1 <= M <= {MAX_M} and contiguous K, got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be one of {_DTYPES}, got {x.dtype}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    m = x.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gguf_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, data, half, bias if bias is not None else x, out, m, n, k, x.stride(0), stride, out.stride(0),
        M_PAD=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        QTYPE=GGUF_BLOCKS[w.qtype][0], HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32)
    return out


def gguf_matmul(x: torch.Tensor, w: GGUFWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """KernelSet.gguf_matmul: the fused GEMV for a few tokens, dequantize + cuBLAS beyond."""
    if x.dim() == 2 and 0 < x.shape[0] <= MAX_M:
        return gguf_gemv(x if x.stride(1) == 1 else x.contiguous(), w, bias)
    return F.linear(x, gguf_dequantize(w, x.dtype), bias)
