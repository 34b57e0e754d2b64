"""Token embedding and LM head (optionally tied to the embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagedserve.model_executor.layers.context import BuildContext

__all__ = ["VocabEmbedding", "LMHead", "default_weight_loader"]


def default_weight_loader(param: Tensor, loaded: Tensor) -> None:
    """Whole-tensor copy with a shape check (casts to the parameter's dtype/device)."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit "
                         f"parameter of shape {tuple(param.shape)}")
    param.data.copy_(loaded)


class VocabEmbedding(nn.Module):
    """input_ids [T] int64 -> [T, hidden]. Weight [vocab, hidden], uninitialised until loaded."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, ctx: BuildContext) -> None:
        super().__init__()
        self.prefix = ctx.prefix
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LMHead(nn.Module):
    """hidden [N, hidden] -> logits [N, vocab] float32.

    Tied: shares the embedding's Parameter (one tensor in memory; the checkpoint usually omits
    lm_head.weight then, and a present one is skipped by the model's load_weights).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 tie_to: VocabEmbedding | None = None, *, ctx: BuildContext) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.tied = tie_to is not None
        if tie_to is not None:
            if tie_to.weight.shape != (num_embeddings, embedding_dim):
                raise ValueError("tied LM head and embedding must have the same shape")
            self.weight = tie_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim),
                                       requires_grad=False)
        kernels = ctx.kernels  # bound once: the decode GEMV for a few rows, as in Linear
        self._gemv = kernels.fused_gemv
        self._gemv_max_tokens = kernels.gemv_limits.plain

    def forward(self, hidden: Tensor) -> Tensor:
        # matmul in the model dtype, logits returned in float32 for the sampler
        if self._gemv is not None and hidden.dim() == 2 and 0 < hidden.shape[0] <= self._gemv_max_tokens:
            return self._gemv(hidden, self.weight).float()
        return F.linear(hidden, self.weight).float()

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, tied={self.tied}"
