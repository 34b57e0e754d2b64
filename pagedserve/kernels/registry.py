"""The pointwise kernels a model's layers call (RMSNorm, rotary, SiLU-and-mul), chosen once.

    "torch"  -> kernels/reference.py (the CPU path and the oracle)
    "triton" -> kernels/triton/*.py  (GPU)

`load_model` calls `use_kernels(name)` before building the model; each layer binds the active set
when it is constructed, so the forward pass does no lookups and no device checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagedserve.kernels import reference


@dataclass(frozen=True, slots=True)
class PointwiseKernels:
    name: str
    rms_norm: Callable[..., Any]
    fused_add_rms_norm: Callable[..., Any]
    rotary_embedding: Callable[..., Any]
    silu_and_mul: Callable[..., Any]


TORCH_KERNELS = PointwiseKernels(
    "torch", reference.rms_norm, reference.fused_add_rms_norm, reference.rotary_embedding,
    reference.silu_and_mul,
)


def _triton_kernels() -> PointwiseKernels:
    from pagedserve.kernels.triton.activation import silu_and_mul
    from pagedserve.kernels.triton.norm import fused_add_rms_norm, rms_norm
    from pagedserve.kernels.triton.rotary import rotary_embedding

    return PointwiseKernels("triton", rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul)


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
