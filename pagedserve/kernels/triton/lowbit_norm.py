"""The RMSNorm prologue shared by the low-bit fused GEMVs (lut_gemv.py, gguf_matmul.py).

A kernel that folds `rms_norm(x [+ residual]) * norm_weight` in front of its matmul calls
`norm_rstd` once (pass 1 over x: per-row sum of squares; program 0 also writes the residual sum
s = x + residual, which the other programs never read back) and then `x_tile` for every K step of
its main loop (s again, normalised). Roundings follow kernels/reference.py: s in the model dtype,
(s * rstd) rounded to it, times norm_weight rounded to it (two roundings, as Hugging Face Llama).
x rows past M are loaded as zeros (their outputs are masked off by the caller).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def norm_rstd(x_ptr, res_ptr, res_out_ptr, offs_m, M, K, stride_x, stride_res, stride_res_out, eps,
              M_PAD: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """rstd [M_PAD] float32 = 1 / sqrt(mean(s^2) + eps); writes s to res_out (program 0 only)."""
    dtype = x_ptr.dtype.element_ty
    kk = tl.arange(0, NORM_BLOCK)[None, :]
    m_mask = offs_m[:, None] < M
    # (rows < writer_rows rather than `& (pid == 0)`: a scalar bool in a block mask is rejected
    # by newer Triton interpreters)
    writer_rows = tl.where(tl.program_id(0) == 0, M, 0)
    ss = tl.zeros([M_PAD, NORM_BLOCK], dtype=tl.float32)
    for k0 in range(0, K, NORM_BLOCK):
        mask = m_mask & ((k0 + kk) < K)
        s = tl.load(x_ptr + offs_m[:, None] * stride_x + k0 + kk, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + offs_m[:, None] * stride_res + k0 + kk, mask=mask, other=0.0)
            s = (s.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(res_out_ptr + offs_m[:, None] * stride_res_out + k0 + kk, s,
                     mask=mask & (offs_m[:, None] < writer_rows))
        sf = s.to(tl.float32)
        ss += sf * sf
    return tl.rsqrt(tl.sum(ss, axis=1) / K + eps)


@triton.jit
def x_tile(x_ptr, res_ptr, nw_ptr, offs_m, offs_k, M, K, stride_x, stride_res, rstd,
           HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The [M_PAD, BK] activation tile at columns offs_k: x, or rms_norm(x [+ residual]) * w."""
    dtype = x_ptr.dtype.element_ty
    k_mask = offs_k < K
    mask = (offs_m[:, None] < M) & k_mask[None, :]
    a = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0)
    if HAS_NORM:
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + offs_m[:, None] * stride_res + offs_k[None, :], mask=mask, other=0.0)
            a = (a.to(tl.float32) + r.to(tl.float32)).to(dtype)
        g = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0)[None, :]
        a = (a.to(tl.float32) * rstd[:, None]).to(dtype)
        a = (a.to(tl.float32) * g.to(tl.float32)).to(dtype)
    return a


def norm_block(k: int, m_pad: int, num_warps: int = 4) -> int:
    """Pass-1 tile: the whole row when it fits ~32 float32 registers per thread."""
    return min(triton.next_power_of_2(k), max(32 * 32 * num_warps // m_pad, 128))


def prepare_norm(x: torch.Tensor, norm_weight: torch.Tensor | None, residual: torch.Tensor | None,
                 eps: float) -> torch.Tensor | None:
    """Check the prologue's operands; returns the buffer for the residual sum (None without one)."""
    if norm_weight is None:
        if residual is not None:
            raise ValueError("residual needs norm_weight (the residual add feeds the norm)")
        return None
    k = x.shape[1]
    if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype or not norm_weight.is_contiguous():
        raise ValueError(f"norm_weight must be a contiguous [{k}] {x.dtype} tensor, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if residual is None:
        return None
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1:
        raise ValueError(f"residual must be a {list(x.shape)} {x.dtype} tensor with contiguous rows, "
                         f"got {tuple(residual.shape)} {residual.dtype}")
    return torch.empty_like(x)
