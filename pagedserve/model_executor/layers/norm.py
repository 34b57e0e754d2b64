"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pagedserve.model_executor.layers.context import BuildContext

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim. Weight is created uninitialised (the loader
    fills it). Also used per head (Qwen3 q_norm/k_norm) on x [T, H, head_dim]."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, ctx: BuildContext) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps
        self._kernels = ctx.kernels  # bound once, at construction

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x [..., H]. With `residual`: returns (norm(x + residual), x + residual)."""
        if residual is None:
            return self._kernels.rms_norm(x, self.weight, self.eps)
        return self._kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
