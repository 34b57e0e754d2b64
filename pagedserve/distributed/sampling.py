"""Sampling under tensor parallelism: rank 0 samples, the other ranks take its tokens.

Every rank holds the same full logits (the vocab-parallel LM head all-gathers them) and the same
request states, and each rank's next input ids come from its own states, so the ranks must agree
on every token. Greedy argmax over identical logits agrees by itself; random sampling would only
agree while every rank's generators stay in lockstep. So rank 0 alone runs the sampler and its
ids reach the others through one small all-reduce (rank 0 contributes the ids, the others zeros):

    rank 0:  ids = sampler(logits)      all_reduce([ids])      -> ids
    rank r:  (no sampling)              all_reduce([0 ... 0])  -> ids

The same for async scheduling's `draw`, whose ids stay on the device (the all-reduce too).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pagedserve.model_executor.layers.context import ParallelGroup
from pagedserve.worker.sampler import Sampler, SamplerOutput, SamplingMetadata

__all__ = ["RankZeroSampler", "make_sampler"]


class RankZeroSampler(Sampler):
    def __init__(self, parallel: ParallelGroup) -> None:
        assert parallel.comm is not None and parallel.world_size > 1
        self.parallel = parallel
        self.comm = parallel.comm

    def __call__(self, logits: Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits [N, vocab] (identical on every rank). Rank 0's result; on the other ranks only
        the token ids (their logprobs are never reported: only rank 0's output leaves the group)."""
        if self.parallel.rank == 0:
            out = super().__call__(logits, meta)
            ids = torch.tensor(out.sampled_token_ids, dtype=torch.int64, device=logits.device)
            self.comm.all_reduce(ids)
            return out
        ids = torch.zeros(meta.num_rows, dtype=torch.int64, device=logits.device)
        self.comm.all_reduce(ids)
        return SamplerOutput(sampled_token_ids=ids.tolist(), logprobs=[None] * meta.num_rows)


    def draw(self, logits: Tensor, meta: SamplingMetadata) -> Tensor:
        """Async scheduling's draw: rank 0's ids [N] int64 on every rank, still on the device."""
        if self.parallel.rank == 0:
            ids = self._draw(logits, meta).to(torch.int64).contiguous()
        else:
            ids = torch.zeros(meta.num_rows, dtype=torch.int64, device=logits.device)
        self.comm.all_reduce(ids)
        return ids


def make_sampler(parallel: ParallelGroup) -> Sampler:
    """The runner's sampler: the plain one for a single rank."""
    return Sampler() if parallel.world_size == 1 else RankZeroSampler(parallel)
