"""Triton backend objects, built once at start-up.

Importing this module never imports Triton: the kernel modules (which need it at import time
for @triton.jit) are imported inside the factory functions, so a CPU-only install can import
pagedserve, ask `triton_available()`, and fall back to the plain-torch twins.

    attention registry ("triton")   -> make_attention_backend()
    norm / rotary / activation      -> make_elementwise_ops()   (same signatures as the twins)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from pagedserve.model_executor.layers.attention import (
    AttentionBackend,
    get_attention_backend,
    register_attention_backend,
)

__all__ = [
    "ElementwiseOps",
    "triton_available",
    "make_attention_backend",
    "make_elementwise_ops",
    "make_reference_elementwise_ops",
    "register_triton_attention_backend",
]


def triton_available() -> bool:
    """True when the triton package can be imported (the kernels still need a CUDA device, or
    TRITON_INTERPRET=1 set before the first kernel import, to run)."""
    return importlib.util.find_spec("triton") is not None


def _require_triton() -> None:
    if not triton_available():
        raise ImportError("the Triton kernels need the 'triton' package (pip install pagedserve[triton])")


def make_attention_backend() -> AttentionBackend:
    """The Triton attention backend: write_kv = Triton KV scatter, attend = paged_attention
    dispatcher (decode / prefill kernels), which accepts max_query_len / max_seq_len keywords,
    rotary_write_kv = fused rotary + KV scatter (one launch per layer instead of two)."""
    _require_triton()
    from pagedserve.kernels.triton.attention import paged_attention
    from pagedserve.kernels.triton.kv_cache import write_kv_cache
    from pagedserve.kernels.triton.rotary import rotary_write_kv_cache

    return AttentionBackend("triton", write_kv=write_kv_cache, attend=paged_attention,
                            accepts_max_lens=True, rotary_write_kv=rotary_write_kv_cache)


def register_triton_attention_backend(name: str = "triton") -> AttentionBackend:
    """Build the backend and register it under `name`; returns the registered object."""
    register_attention_backend(name, make_attention_backend())
    return get_attention_backend(name)


@dataclass(frozen=True, slots=True)
class ElementwiseOps:
    """Kernels outside attention, each with its twin's signature (reference.py)."""

    rms_norm: Callable[..., Tensor]  # (x, weight, eps) -> Tensor
    fused_add_rms_norm: Callable[..., tuple[Tensor, Tensor]]  # (x, residual, weight, eps)
    rotary_embedding: Callable[..., tuple[Tensor, Tensor]]  # (positions, q, k, cos_sin, is_neox)
    silu_and_mul: Callable[[Tensor], Tensor]


def make_elementwise_ops() -> ElementwiseOps:
    _require_triton()
    from pagedserve.kernels.triton.activation import silu_and_mul
    from pagedserve.kernels.triton.norm import fused_add_rms_norm, rms_norm
    from pagedserve.kernels.triton.rotary import rotary_embedding

    return ElementwiseOps(rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul)


def make_reference_elementwise_ops() -> ElementwiseOps:
    """The plain-torch twins in the same bundle (CPU path)."""
    from pagedserve.kernels import reference

    return ElementwiseOps(
        reference.rms_norm, reference.fused_add_rms_norm, reference.rotary_embedding, reference.silu_and_mul
    )
