"""Gated activations."""

from __future__ import annotations

from torch import Tensor, nn

from pagedserve.kernels.registry import active_kernels

__all__ = ["SiluAndMul", "get_gated_activation"]


class SiluAndMul(nn.Module):
    """x [T, 2*I] = [gate | up] -> silu(gate) * up, [T, I]."""

    def __init__(self) -> None:
        super().__init__()
        self._silu_and_mul = active_kernels().silu_and_mul  # bound once, at construction

    def forward(self, x: Tensor) -> Tensor:
        return self._silu_and_mul(x)


def get_gated_activation(hidden_act: str) -> nn.Module:
    """The fused activation for a checkpoint's `hidden_act` (only SiLU / swish is supported)."""
    if hidden_act in ("silu", "swish"):
        return SiluAndMul()
    raise ValueError(f"hidden_act must be one of ['silu', 'swish'], got {hidden_act!r}")
