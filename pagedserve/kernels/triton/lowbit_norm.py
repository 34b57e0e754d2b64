"""What the low-bit fused GEMVs (lut_gemv.py, gguf_matmul.py) share: their launch limits, the
check of their operands, and the RMSNorm prologue.

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

MAX_M = 64  # tokens up to which the fused kernels run; beyond, dequantize + cuBLAS
# Tokens up to which the linear methods ask for the RMSNorm prologue / SiLU-and-mul epilogue.
# Not tuned yet (benchmarks/lut_gguf_bench.py times the plain kernels): every program redoes the
# norm of all M_PAD rows, so the gain is at decode batch sizes.
FUSED_MAX_TOKENS = 4
BLOCK_N, BLOCK_K = 32, 128
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def block_m(m: int) -> int:
    """Rows of x per program: 16 (tl.dot's least) to 32; more rows take more programs."""
    return max(16, min(32, triton.next_power_of_2(m)))


def check_operands(x: torch.Tensor, k: int, bias: torch.Tensor | None, n: int, gated: bool) -> None:
    """x [M, K] (1 <= M <= MAX_M, contiguous K, a model dtype); bias [N]; gated: N even."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be [M, {k}] with 1 <= M <= {MAX_M} and contiguous K, got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype must be one of {DTYPES}, got {x.dtype}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    if gated and n % 2:
        raise ValueError(f"gated weight must have 2*I outputs, got {n}")


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
