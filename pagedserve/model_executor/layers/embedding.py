"""Vocab-parallel token embedding and LM head (optionally tied to the embedding).

The vocabulary is padded to a multiple of the tensor-parallel size and split in equal slices;
rank r holds rows [r*n, (r+1)*n) of the padded table (rows past the real vocab are zeros):

    vocab V = 10, tp = 4 -> padded 12, n = 3:  rank 0: 0..2  rank 1: 3..5  rank 2: 6..8  rank 3: 9 + 2 pad

Embedding: each rank looks up the ids in its slice (others give zero rows), then all-reduce.
LM head: each rank computes its slice of the logits, all-gather along the vocab, trim the pad.
With world_size 1 there is no padding, no masking and no collective: today's F.embedding and
F.linear / GEMV.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.linear import set_weight_attrs

__all__ = ["LMHead", "ParallelLMHead", "VocabEmbedding", "VocabParallelEmbedding",
           "default_weight_loader"]


def default_weight_loader(param: Tensor, loaded: Tensor) -> None:
    """Whole-tensor copy with a shape check (casts to the parameter's dtype/device)."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit "
                         f"parameter of shape {tuple(param.shape)}")
    param.data.copy_(loaded)


class VocabParallelEmbedding(nn.Module):
    """input_ids [T] int64 -> [T, hidden]. Weight [padded_vocab / tp, hidden] (this rank's rows),
    uninitialised until loaded."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, ctx: BuildContext,
                 shared_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        group = ctx.parallel
        self.prefix = ctx.prefix
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_size = group.world_size
        self.rows_per_rank = -(-num_embeddings // group.world_size)  # ceil
        self.padded_num_embeddings = self.rows_per_rank * group.world_size
        self.vocab_start = group.rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)  # may be <= start
        if shared_weight is not None:  # a tied LM head: the embedding's table, already set up
            self.weight = shared_weight
        else:
            self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim),
                                       requires_grad=False)
            # the vocab dim is the split one; the loader copies this rank's rows
            set_weight_attrs(self.weight, {"output_dim": 0, "weight_loader": self.weight_loader})
        if group.comm is not None:  # a group (world_size >= 1); without one forward() is F.embedding alone
            self._all_reduce = group.comm.all_reduce
            self.forward = self._forward_parallel  # type: ignore[method-assign]

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight)

    def _forward_parallel(self, input_ids: Tensor) -> Tensor:
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill_(outside, 0)
        out = F.embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)
        return cast(Tensor, self._all_reduce(out))

    def weight_loader(self, param: Tensor, loaded: Tensor) -> None:
        """loaded [vocab, hidden]: copy this rank's rows, zero the padding rows."""
        if loaded.shape != (self.num_embeddings, param.shape[1]):
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit the "
                             f"vocabulary table ({self.num_embeddings}, {param.shape[1]})")
        n = max(self.vocab_end - self.vocab_start, 0)
        param.data[:n].copy_(loaded[self.vocab_start:self.vocab_start + n])
        param.data[n:].zero_()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows={self.vocab_start}..{self.vocab_end}"


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [N, hidden] -> logits [N, vocab] float32 (the whole vocab on every rank).

    Tied: shares the embedding's Parameter (one tensor in memory, the same vocab slice; the
    checkpoint usually omits lm_head.weight then, and a present one is skipped by load_weights).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 tie_to: VocabParallelEmbedding | None = None, *, ctx: BuildContext) -> None:
        if tie_to is not None and (tie_to.num_embeddings, tie_to.embedding_dim) != (
                num_embeddings, embedding_dim):
            raise ValueError("tied LM head and embedding must have the same shape")
        super().__init__(num_embeddings, embedding_dim, ctx=ctx,
                         shared_weight=tie_to.weight if tie_to is not None else None)
        self.tied = tie_to is not None
        kernels = ctx.kernels  # bound once: the decode GEMV for a few rows, as in the linears
        self._gemv = kernels.fused_gemv
        self._gemv_max_tokens = kernels.gemv_limits.plain
        comm = ctx.parallel.comm
        if comm is not None:
            self._all_gather = comm.all_gather
            self.forward = self._forward_gather  # type: ignore[method-assign]

    def forward(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        # matmul in the model dtype, logits returned in float32 for the sampler; `out` [N, vocab]
        # float32 receives them instead of a new tensor (the CUDA graphs' one shared buffer)
        if self._gemv is not None and hidden.dim() == 2 and 0 < hidden.shape[0] <= self._gemv_max_tokens:
            logits = cast(Tensor, self._gemv(hidden, self.weight))
        else:
            logits = F.linear(hidden, self.weight)
        return out.copy_(logits) if out is not None else logits.float()

    def _forward_gather(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        if self._gemv is not None and hidden.dim() == 2 and 0 < hidden.shape[0] <= self._gemv_max_tokens:
            local = cast(Tensor, self._gemv(hidden, self.weight))
        else:
            local = F.linear(hidden, self.weight)
        logits = cast(Tensor, self._all_gather(local, -1))  # [N, padded vocab]
        if self.padded_num_embeddings != self.num_embeddings:
            logits = logits[..., :self.num_embeddings]
        return out.copy_(logits) if out is not None else logits.float().contiguous()

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, tied={self.tied}"


# The names the model code used before the vocab-parallel layers.
VocabEmbedding = VocabParallelEmbedding
LMHead = ParallelLMHead
