"""Triton RMSNorm and fused residual-add + RMSNorm (twins: reference.rms_norm / fused_add_rms_norm).

One program per row [H]. A program reads its whole row before writing anything, so `out` may alias
`x` and `residual_out` may alias `residual` (in-place use): no program touches another's row.

Rounding follows Hugging Face Llama: the residual sum is rounded to the input dtype first, the
statistics are float32, the normalised row is rounded to the input dtype before the weight multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to the activation dtype, as the unfused model does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / hidden
    normed = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual_out: torch.Tensor | None,
) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    num_rows, hidden = x.shape
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape [{hidden}], got {tuple(weight.shape)}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    tensors = [x, out] + ([residual, residual_out] if residual is not None else [])
    for t in tensors:
        if t is None or t.shape != x.shape or t.stride(-1) != 1:
            raise ValueError(
                "x, residual and outputs must share shape [T, H] with a contiguous last dimension"
            )
    if num_rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 256, 1), 16)
    res = residual if residual is not None else x
    res_out = residual_out if residual_out is not None else out
    _rms_norm_kernel[(num_rows,)](
        x,
        res,
        weight,
        out,
        res_out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        res_out.stride(0),
        hidden,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps,
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [N, H] view (a copy only if the leading dims cannot be merged)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., H], weight [H] -> x / sqrt(mean(x^2) + eps) * weight, in the promoted dtype of x and
    weight (the twin's `weight * x` promotion; normally both are the model dtype)."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    _launch(_rows(x), None, weight, eps, out.view(-1, x.shape[-1]), None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., H] -> (rms_norm(x + residual), x + residual); the sum is rounded to x's
    dtype. Pass out=x, residual_out=residual to work in place."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual_out is None:
        residual_out = torch.empty_like(x)
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    _launch(_rows(x), _rows(residual), weight, eps, out.view(-1, hidden), residual_out.view(-1, hidden))
    return out, residual_out
