"""Triton SqueezeLLM kernels (twin: reference_lut.lut_matmul; layout diagram there).

    lut_matmul(x [M, K], qweight int32 [K/8, N], lookup_table [N, 16], bias) -> y [M, N]
      M <= MAX_M  one fused kernel: program (p, q) owns BLOCK_N output columns and M_PAD (16
                  or 32) rows of x and walks K, decoding a [BLOCK_K, BLOCK_N] weight tile in
                  registers per step:
                      word  = qweight[k // 8, n]            (one int32 feeds 8 rows of k)
                      idx   = word >> 4 (k % 8) & 15
                      w     = lookup_table[n, idx]          (a gather from a 16-entry row:
                                                             BLOCK_N * 32 bytes, L1-resident)
                  then acc [M_PAD, BN] += x tile [M_PAD, BK] @ w (tl.dot, float32 accumulate;
                  float32 models multiply in IEEE precision, not TF32). The weight (4 bits per
                  value) is read once: decode is bandwidth bound, so this reads ~1/4 of fp16.
                  Decode extras as fused_gemv's (up to FUSED_MAX_TOKENS, asked by the method):
                  the RMSNorm prologue (lowbit_norm.py) and, for columns [gate | up], two
                  accumulators and silu(gate) * up before the one rounding.
      M > MAX_M   lut_dequantize -> W [N, K] in x's dtype, then F.linear (cuBLAS)

Launch parameters are fixed (no autotuning: these run inside CUDA graphs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pagedserve.kernels.triton.lowbit_norm import (
    BLOCK_K,
    BLOCK_N,
    FUSED_MAX_TOKENS,
    MAX_M,
    block_m,
    check_operands,
    norm_block,
    norm_rstd,
    prepare_norm,
    x_tile,
)

__all__ = ["FUSED_MAX_TOKENS", "MAX_M", "lut_dequantize", "lut_gemv", "lut_matmul"]


@triton.jit
def _decode(qw_ptr, lut_ptr, offs_k, offs_n, NCOLS, mask):
    """Weight tile [BK, BN] (lookup-table dtype) for rows offs_k [BK] and columns offs_n [BN] of
    a qweight with NCOLS columns."""
    words = tl.load(qw_ptr + (offs_k // 8)[:, None].to(tl.int64) * NCOLS + offs_n[None, :], mask=mask, other=0)
    idx = (words >> ((offs_k % 8) * 4)[:, None]) & 15
    return tl.load(lut_ptr + offs_n[None, :].to(tl.int64) * 16 + idx, mask=mask, other=0.0)


@triton.jit
def _lut_gemv_kernel(x_ptr, res_ptr, nw_ptr, qw_ptr, lut_ptr, b_ptr, out_ptr, res_out_ptr,
                     M, N, K, stride_x, stride_res, stride_out, stride_res_out, eps,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NORM_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr):
    """out [M, N] = prologue(x) @ W[:, cols] (+ bias); GATED: qweight has 2N columns [gate | up],
    out = silu(gate) * up in float32, rounded once."""
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    ncols = N  # qweight columns
    if GATED:
        ncols = 2 * N
    offs_m = tl.program_id(1) * M_PAD + tl.arange(0, M_PAD)  # this program's rows of x
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rstd = tl.zeros([M_PAD], dtype=tl.float32)
    if HAS_NORM:
        rstd = norm_rstd(x_ptr, res_ptr, res_out_ptr, offs_m, M, K, stride_x, stride_res, stride_res_out,
                         eps, M_PAD, NORM_BLOCK, HAS_RESIDUAL)
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        wmask = (offs_k < K)[:, None] & n_mask[None, :]
        x = x_tile(x_ptr, res_ptr, nw_ptr, offs_m, offs_k, M, K, stride_x, stride_res, rstd,
                   HAS_NORM, HAS_RESIDUAL)
        w = _decode(qw_ptr, lut_ptr, offs_k, offs_n, ncols, wmask).to(dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
        if GATED:
            u = _decode(qw_ptr, lut_ptr, offs_k, offs_n + N, ncols, wmask).to(dtype)
            if IEEE:
                acc_up += tl.dot(x, u, input_precision="ieee")
            else:
                acc_up += tl.dot(x, u)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(dtype),
             mask=(offs_m[:, None] < M) & n_mask[None, :])


@triton.jit
def _lut_dequant_kernel(qw_ptr, lut_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N, K] (nn.Linear layout) = lut[n, idx[k, n]], one [BK, BN] tile per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    w = _decode(qw_ptr, lut_ptr, offs_k, offs_n, N, mask)
    tl.store(out_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None],
             w.to(out_ptr.dtype.element_ty), mask=mask)


def _check(qweight: torch.Tensor, lookup_table: torch.Tensor) -> tuple[int, int]:
    if qweight.dim() != 2 or qweight.dtype != torch.int32 or not qweight.is_contiguous():
        raise ValueError(f"qweight must be a contiguous int32 [K/8, N] tensor, got {tuple(qweight.shape)} "
                         f"{qweight.dtype}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if lookup_table.shape != (n, 16) or not lookup_table.is_contiguous():
        raise ValueError(f"lookup_table must be a contiguous [{n}, 16] tensor, got {tuple(lookup_table.shape)}")
    return k, n


def lut_dequantize(qweight: torch.Tensor, lookup_table: torch.Tensor, dtype: torch.dtype,
                   block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """W [N, K] in `dtype` (reference_lut.dequantize_lut, then .to(dtype))."""
    k, n = _check(qweight, lookup_table)
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    _lut_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        qweight, lookup_table, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def lut_gemv(x: torch.Tensor, qweight: torch.Tensor, lookup_table: torch.Tensor,
             bias: torch.Tensor | None = None, *, norm_weight: torch.Tensor | None = None,
             residual: torch.Tensor | None = None, eps: float = 1e-6, gated: bool = False,
             block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> Any:
    """The fused kernel: x [M, K] (1 <= M <= MAX_M, contiguous K) -> y [M, N] in x's dtype, with
    reference_lut.lut_matmul's extras: norm_weight (then (y, x [+ residual]) is returned) and
    gated (columns [gate | up], y [M, N / 2])."""
    k, cols = _check(qweight, lookup_table)
    check_operands(x, k, bias, cols, gated)
    res_out = prepare_norm(x, norm_weight, residual, eps)
    m, n = x.shape[0], cols // 2 if gated else cols
    m_pad = block_m(m)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res = residual if residual is not None else x
    res_o = res_out if res_out is not None else out
    _lut_gemv_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, m_pad))](
        x, res, norm_weight if norm_weight is not None else x, qweight, lookup_table,
        bias if bias is not None else x, out, res_o, m, n, k, x.stride(0), res.stride(0), out.stride(0),
        res_o.stride(0), float(eps), M_PAD=m_pad, BLOCK_N=block_n, BLOCK_K=block_k,
        NORM_BLOCK=norm_block(k, m_pad), HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None,
        HAS_RESIDUAL=residual is not None, GATED=gated, IEEE=x.dtype == torch.float32)
    if norm_weight is None:
        return out
    return out, (res_out if res_out is not None else x)


def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, lookup_table: torch.Tensor,
               bias: torch.Tensor | None = None, *, norm_weight: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, eps: float = 1e-6, gated: bool = False) -> Any:
    """KernelSet.lut_matmul: the fused GEMV (with the norm / SiLU-and-mul extras) for a few
    tokens, dequantize + cuBLAS beyond (the callers ask for the extras within FUSED_MAX_TOKENS)."""
    if x.dim() == 2 and 0 < x.shape[0] <= MAX_M:
        return lut_gemv(x if x.stride(1) == 1 else x.contiguous(), qweight, lookup_table, bias,
                        norm_weight=norm_weight, residual=residual, eps=eps, gated=gated)
    if norm_weight is not None or gated:
        raise ValueError(f"the norm / gated extras are fused for at most {MAX_M} tokens, got {x.shape[0]}")
    return F.linear(x, lut_dequantize(qweight, lookup_table, x.dtype), bias)
