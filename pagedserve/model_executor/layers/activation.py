"""Gated activations."""

from __future__ import annotations

from torch import Tensor, nn

from pagedserve.model_executor.layers.context import BuildContext

__all__ = ["SiluAndMul", "get_gated_activation"]


class SiluAndMul(nn.Module):
    """x [T, 2*I] = [gate | up] -> silu(gate) * up, [T, I]."""

    def __init__(self, *, ctx: BuildContext) -> None:
        super().__init__()
        self._silu_and_mul = ctx.kernels.silu_and_mul  # bound once, at construction

    def forward(self, x: Tensor) -> Tensor:
        return self._silu_and_mul(x)


def get_gated_activation(hidden_act: str, *, ctx: BuildContext) -> nn.Module:
    """The fused activation for a checkpoint's `hidden_act` (only SiLU / swish is supported)."""
    if hidden_act in ("silu", "swish"):
        return SiluAndMul(ctx=ctx)
    raise ValueError(f"hidden_act must be one of ['silu', 'swish'], got {hidden_act!r}")
