"""Triton SiLU-and-multiply for gated MLPs (twin: reference.silu_and_mul).

x [T, 2*I] = [gate | up]  ->  out [T, I] = silu(gate) * up, computed in float32, rounded once.
Grid: (T, cdiv(I, BLOCK)); each program handles BLOCK columns of one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2*I] -> [..., I] = silu(x[..., :I]) * x[..., I:]."""
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x must be [..., 2*I] with an even last dimension, got {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    out_full = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = out_full.view(-1, inter)
    num_rows = x.shape[0]
    if num_rows == 0 or inter == 0:
        return out_full
    block = min(_BLOCK, triton.next_power_of_2(inter))
    grid = (num_rows, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4)
    return out_full
