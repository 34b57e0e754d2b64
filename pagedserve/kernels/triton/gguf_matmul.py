"""Triton kernels for GGUF weights kept as raw blocks (twin: reference_gguf.gguf_matmul; the
block layouts are drawn there).

    gguf_matmul(x [M, K], GGUFWeight(data uint8 [N, K/B*S], qtype, K), bias) -> y [M, N]
      M <= MAX_M  one fused kernel per block type (QTYPE constexpr): program (p, q) owns BLOCK_N
                  output rows of the weight and M_PAD (16 or 32) rows of x, and walks K; each
                  step decodes a [BLOCK_N, BLOCK_K] tile of values in registers straight from
                  the blocks and does acc [M_PAD, BN] += x tile [M_PAD, BK] @ tile^T (tl.dot,
                  float32 accumulate; IEEE precision for float32 models). The weight bytes are
                  read once per M_PAD rows of x (from L2 after the first).
                  Decode extras as fused_gemv's (up to FUSED_MAX_TOKENS, asked by the method):
                  the RMSNorm prologue (lowbit_norm.py) and, for W = [gate | up], two
                  accumulators and silu(gate) * up before the one rounding.
      M > MAX_M   gguf_dequantize -> W [N, K] in x's dtype, then F.linear (cuBLAS)

Decoding a tile: value (n, k) lives in block b = k // B of row n, at byte base = n * row_stride
+ b * S. `_tile` views the [BN, BK] tile as [BN, BK / L, L], L values that share one scale (a
32-block, a Q4_K sub-block of 32, a Q6_K group of 16): byte offsets, scales and mins are computed
once per (row, group) by the formulas of reference_gguf and broadcast over L, and only the quant
bytes are read per value (L contiguous bytes from one row). BLOCK_K is any power-of-2 multiple of
32, so a tile may cover part of a 256-value K-quant block. float16 fields (d, m, dmin) are read
through a float16 view of the same bytes at base / 2 (block starts are even: S and the row stride
are even).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pagedserve.kernels.reference_gguf import GGUF_BLOCKS, GGUFWeight, row_bytes
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

__all__ = ["FUSED_MAX_TOKENS", "MAX_M", "gguf_dequantize", "gguf_gemv", "gguf_matmul"]


@triton.jit
def _byte(u8_ptr, offs, mask):
    return tl.load(u8_ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _half(f16_ptr, byte_offs, mask):
    return tl.load(f16_ptr + byte_offs // 2, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile(u8_ptr, f16_ptr, rows, n_mask, k0, K, stride_row, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, L: tl.constexpr):
    """float32 [BN, BK]: values k0 .. k0 + BK (k0 a multiple of 32) of rows [BN] (int64) of a
    QTYPE weight, in the order of operations of reference_gguf (and gguf.quants).

    The tile is decoded as [BN, G, L] = [rows, groups of L values sharing one scale, position]:
    scales, mins and byte offsets are computed once per (row, group) and broadcast over L; only
    the quant bytes are read per value (L contiguous bytes, or L/2 read twice for nibbles).
    L = _group(QTYPE): 16 for Q6_K (one int8 scale per 16), else 32 (a block, or a Q4_K sub-block)."""
    g = k0 // L + tl.arange(0, BLOCK_K // L)  # global group index along K [G]
    gmask = n_mask[:, None] & (g < K // L)[None, :]  # [BN, G]
    m3 = gmask[:, :, None]
    lane = tl.arange(0, L)[None, None, :]  # [1, 1, L]
    # (a flat chain of constexpr branches, one per type; a group of 32 is one block of Q4_0/1, Q8_0)
    if QTYPE == 2:  # Q4_0: d | qs[16]
        base = rows[:, None] * stride_row + (g * 18)[None, :]  # [BN, G]
        nib = (_byte(u8_ptr, base[:, :, None] + 2 + lane % 16, m3) >> (4 * (lane // 16))) & 15
        w = _half(f16_ptr, base, gmask)[:, :, None] * (nib - 8).to(tl.float32)
    elif QTYPE == 3:  # Q4_1: d | m | qs[16]
        base = rows[:, None] * stride_row + (g * 20)[None, :]
        nib = (_byte(u8_ptr, base[:, :, None] + 4 + lane % 16, m3) >> (4 * (lane // 16))) & 15
        w = _half(f16_ptr, base, gmask)[:, :, None] * nib.to(tl.float32) + _half(f16_ptr, base + 2, gmask)[:, :, None]
    elif QTYPE == 8:  # Q8_0: d | qs[32] int8
        base = rows[:, None] * stride_row + (g * 34)[None, :]
        q = tl.load(u8_ptr + base[:, :, None] + 2 + lane, mask=m3, other=0).to(tl.int8, bitcast=True)
        w = q.to(tl.float32) * _half(f16_ptr, base, gmask)[:, :, None]
    elif QTYPE == 12:  # Q4_K: sub-block s of a 144-byte block; 6-bit scale and min
        base = rows[:, None] * stride_row + ((g // 8) * 144)[None, :]  # [BN, G]
        s = (g % 8)[None, :]
        p = _byte(u8_ptr, base + 4 + s, gmask)  # scales[s]
        q4 = _byte(u8_ptr, base + 8 + s, gmask)  # scales[s + 4]
        r = _byte(u8_ptr, base + 4 + tl.where(s >= 4, s - 4, s), gmask)  # scales[s - 4]
        sc = tl.where(s < 4, p & 63, (q4 & 15) | ((r >> 6) << 4))
        mn = tl.where(s < 4, q4 & 63, (q4 >> 4) | ((p >> 6) << 4))
        d = (_half(f16_ptr, base, gmask) * sc.to(tl.float32))[:, :, None]
        dm = (_half(f16_ptr, base + 2, gmask) * mn.to(tl.float32))[:, :, None]
        qs = base + 16 + 32 * (s // 2)
        q = (_byte(u8_ptr, qs[:, :, None] + lane, m3) >> (4 * (s % 2))[:, :, None]) & 15
        w = d * q.to(tl.float32) - dm
    else:  # QTYPE == 14, Q6_K: group t of 16 in a 210-byte block; j = 16 t + lane
        base = rows[:, None] * stride_row + ((g // 16) * 210)[None, :]
        t = (g % 16)[None, :]
        h = t // 8  # which 128-value half
        u = t % 8  # group within the half: rr = 16 u + lane
        lo_at = base + 64 * h + 16 * (u % 4)  # ql[64 h + rr % 64], shift 4 (rr // 64)
        hi_at = base + 128 + 32 * h + 16 * (u % 2)  # qh[32 h + rr % 32], shift 2 (rr // 32)
        lo = (_byte(u8_ptr, lo_at[:, :, None] + lane, m3) >> (4 * (u // 4))[:, :, None]) & 15
        hi = (_byte(u8_ptr, hi_at[:, :, None] + lane, m3) >> (2 * (u // 2))[:, :, None]) & 3
        q = (lo | (hi << 4)) - 32
        sc = tl.load(u8_ptr + base + 192 + t, mask=gmask, other=0).to(tl.int8, bitcast=True)
        d = (_half(f16_ptr, base + 208, gmask) * sc.to(tl.float32))[:, :, None]
        w = d * q.to(tl.float32)
    return tl.reshape(w, [BLOCK_N, BLOCK_K])


@triton.jit
def _gguf_gemv_kernel(x_ptr, res_ptr, nw_ptr, u8_ptr, f16_ptr, b_ptr, out_ptr, res_out_ptr,
                      M, N, K, stride_x, stride_res, stride_w, stride_out, stride_res_out, eps,
                      M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      NORM_BLOCK: tl.constexpr, QTYPE: tl.constexpr, L: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      GATED: tl.constexpr, IEEE: tl.constexpr):
    """out [M, N] = prologue(x) @ W[rows].T (+ bias); GATED: W = [gate rows | up rows] (2N rows),
    out = silu(gate) * up, kept in float32 and rounded once."""
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.program_id(1) * M_PAD + tl.arange(0, M_PAD)  # this program's rows of x
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    rstd = tl.zeros([M_PAD], dtype=tl.float32)
    if HAS_NORM:
        rstd = norm_rstd(x_ptr, res_ptr, res_out_ptr, offs_m, M, K, stride_x, stride_res, stride_res_out,
                         eps, M_PAD, NORM_BLOCK, HAS_RESIDUAL)
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = x_tile(x_ptr, res_ptr, nw_ptr, offs_m, offs_k, M, K, stride_x, stride_res, rstd,
                   HAS_NORM, HAS_RESIDUAL)
        # [BK, BN] weight tiles, rounded to the model dtype as the twin does
        wt = tl.trans(_tile(u8_ptr, f16_ptr, rows, n_mask, k0, K, stride_w, QTYPE, BLOCK_N, BLOCK_K, L).to(dtype))
        if IEEE:
            acc += tl.dot(x, wt, input_precision="ieee")
        else:
            acc += tl.dot(x, wt)
        if GATED:
            ut = tl.trans(_tile(u8_ptr, f16_ptr, rows + N, n_mask, k0, K, stride_w, QTYPE, BLOCK_N, BLOCK_K,
                                L).to(dtype))
            if IEEE:
                acc_up += tl.dot(x, ut, input_precision="ieee")
            else:
                acc_up += tl.dot(x, ut)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(dtype),
             mask=(offs_m[:, None] < M) & n_mask[None, :])


@triton.jit
def _gguf_dequant_kernel(u8_ptr, f16_ptr, out_ptr, N, K, stride_w, QTYPE: tl.constexpr, L: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N, K] in its dtype = the decoded values, one [BN, BK] tile per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = _tile(u8_ptr, f16_ptr, offs_n.to(tl.int64), offs_n < N, tl.program_id(1) * BLOCK_K, K, stride_w,
              QTYPE, BLOCK_N, BLOCK_K, L)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask)


def _group(qtype: str) -> int:
    """Values per scale group in _tile: 16 for Q6_K, 32 for the others."""
    return 16 if qtype == "Q6_K" else 32


def _check_tiles(block_n: int, block_k: int) -> None:
    if block_k % 32 or block_k & (block_k - 1) or block_n & (block_n - 1):
        raise ValueError(f"block_k must be a power of 2 and a multiple of 32, block_n a power of 2; "
                         f"got {block_n}, {block_k}")


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
    _check_tiles(block_n, block_k)
    data, half, stride = _views(w)
    n, k = w.out_features, w.in_features
    out = torch.empty((n, k), dtype=dtype, device=data.device)
    _gguf_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        data, half, out, n, k, stride, QTYPE=GGUF_BLOCKS[w.qtype][0], L=_group(w.qtype),
        BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def gguf_gemv(x: torch.Tensor, w: GGUFWeight, bias: torch.Tensor | None = None, *,
              norm_weight: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              eps: float = 1e-6, gated: bool = False, block_n: int = BLOCK_N,
              block_k: int = BLOCK_K) -> Any:
    """The fused kernel: x [M, K] (1 <= M <= MAX_M, contiguous K) -> y [M, N] in x's dtype, with
    reference_gguf.gguf_matmul's extras: norm_weight (then (y, x [+ residual]) is returned) and
    gated (W = [gate | up], y [M, N / 2])."""
    _check_tiles(block_n, block_k)
    data, half, stride = _views(w)
    rows, k = w.out_features, w.in_features
    check_operands(x, k, bias, rows, gated)
    res_out = prepare_norm(x, norm_weight, residual, eps)
    m, n = x.shape[0], rows // 2 if gated else rows
    m_pad = block_m(m)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res = residual if residual is not None else x
    res_o = res_out if res_out is not None else out
    _gguf_gemv_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, m_pad))](
        x, res, norm_weight if norm_weight is not None else x, data, half, bias if bias is not None else x,
        out, res_o, m, n, k, x.stride(0), res.stride(0), stride, out.stride(0), res_o.stride(0), float(eps),
        M_PAD=m_pad, BLOCK_N=block_n, BLOCK_K=block_k, NORM_BLOCK=norm_block(k, m_pad),
        QTYPE=GGUF_BLOCKS[w.qtype][0], L=_group(w.qtype), HAS_BIAS=bias is not None,
        HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, GATED=gated,
        IEEE=x.dtype == torch.float32)
    if norm_weight is None:
        return out
    return out, (res_out if res_out is not None else x)


def gguf_matmul(x: torch.Tensor, w: GGUFWeight, bias: torch.Tensor | None = None, *,
                norm_weight: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                eps: float = 1e-6, gated: bool = False) -> Any:
    """KernelSet.gguf_matmul: the fused GEMV (with the norm / SiLU-and-mul extras) for a few
    tokens; dequantize + cuBLAS beyond (the callers only ask for the extras within
    FUSED_MAX_TOKENS)."""
    if x.dim() == 2 and 0 < x.shape[0] <= MAX_M:
        return gguf_gemv(x if x.stride(1) == 1 else x.contiguous(), w, bias, norm_weight=norm_weight,
                         residual=residual, eps=eps, gated=gated)
    if norm_weight is not None or gated:
        raise ValueError(f"the norm / gated extras are fused for at most {MAX_M} tokens, got {x.shape[0]}")
    return F.linear(x, gguf_dequantize(w, x.dtype), bias)
