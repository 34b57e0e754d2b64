"""The pointwise kernels a model's layers call (RMSNorm, rotary, SiLU-and-mul, and the fused
small-batch GEMV), chosen once.

    "torch"  -> kernels/reference.py (the CPU path and the oracle)
    "triton" -> kernels/triton/*.py  (GPU)

`load_model` calls `use_kernels(name)` before building the model; each layer binds the active set
when it is constructed, so the forward pass does no lookups and no device checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedserve.kernels import reference


@dataclass(frozen=True, slots=True)
class GemvLimits:
    """Most tokens for which fused_gemv beats the unfused path, per variant."""

    plain: int  # x @ W.T
    norm: int  # rms_norm(x [+ residual]) @ W.T
    gated: int  # silu(gate) * up of rms_norm(x [+ residual]) @ [W_gate | W_up].T


@dataclass(frozen=True, slots=True)
class PointwiseKernels:
    name: str
    rms_norm: Callable[..., Any]
    fused_add_rms_norm: Callable[..., Any]
    rotary_embedding: Callable[..., Any]
    silu_and_mul: Callable[..., Any]
    # fused_gemv(x, weight, bias=, norm_weight=, residual=, eps=, gated=): the small-batch
    # (decode) path of the linear layers, with the RMSNorm before a projection and the
    # SiLU-and-mul after gate_up folded in, used up to the token counts in gemv_limits. None: no
    # such path (the torch set: on CPU there is nothing to gain; tests inject the twin).
    fused_gemv: Callable[..., Any] | None = None
    gemv_limits: GemvLimits = field(default_factory=lambda: GemvLimits(0, 0, 0))


TORCH_KERNELS = PointwiseKernels(
    "torch", reference.rms_norm, reference.fused_add_rms_norm, reference.rotary_embedding,
    reference.silu_and_mul,
)


def _triton_kernels() -> PointwiseKernels:
    from pagedserve.kernels.triton.activation import silu_and_mul
    from pagedserve.kernels.triton.gemv import MAX_M, fused_gemv, prefer_fused_gemv
    from pagedserve.kernels.triton.norm import fused_add_rms_norm, rms_norm
    from pagedserve.kernels.triton.rotary import rotary_embedding

    def limit(norm: bool, gated: bool) -> int:
        return max((m for m in range(1, MAX_M + 1) if prefer_fused_gemv(m, norm=norm, gated=gated)),
                   default=0)

    return PointwiseKernels("triton", rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul,
                            fused_gemv=fused_gemv,
                            gemv_limits=GemvLimits(limit(False, False), limit(True, False), limit(True, True)))


_active: PointwiseKernels = TORCH_KERNELS


def use_kernels(name: str) -> PointwiseKernels:
    """Select the pointwise kernels for layers built from now on."""
    global _active
    if name == "torch":
        _active = TORCH_KERNELS
    elif name == "triton":
        _active = _triton_kernels()
    else:
        raise ValueError(f"kernel set must be 'torch' or 'triton', got {name!r}")
    return _active


def active_kernels() -> PointwiseKernels:
    return _active
