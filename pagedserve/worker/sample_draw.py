"""Truncation and the draw: min-p, top-k / top-p, and the exponential race (sampler.py's order).

top-k / top-p keep a prefix of each row in descending logit order. The sampler decides it on the
C largest logits (reference_sampling.select_candidates), draws every row on those C columns
(candidate_race) and redraws the rows they cannot decide over the full row (choose_redraw_kernel),
all without a host sync on the GPU; apply_top_k_top_p is the full-row form, with the full sort
(top_k_top_p_sort) only for the rows the candidates cannot decide.

The exponential race: argmax(p / E) with E ~ Exponential(1) i.i.d. picks token i with probability
p_i; tokens outside the kept set have p = 0, so racing on the candidates alone draws the same
token as racing on the full row when the noise of each token is the same (counter-seeded rows).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagedserve.kernels import reference_sampling
from pagedserve.kernels.reference_sampling import Candidates, top_k_top_p_candidates

if TYPE_CHECKING:
    from pagedserve.worker.sampling_state import SeededDraws

# sampled [N], logits [N, V], undecided [N], top_k, top_p, seeds [N] -> None (sampled in place)
RedrawFn = Callable[[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor], None]


@functools.cache
def choose_redraw_kernel(device_type: str) -> RedrawFn:
    """The undecided rows' full-row redraw: the Triton kernel on CUDA (no host sync, so async
    scheduling keeps its overlap), the torch twin elsewhere (chosen once per device type)."""
    if device_type == "cuda":
        from pagedserve.kernels.registry import triton_available

        if triton_available():
            from pagedserve.kernels.triton.sampling import redraw_undecided

            return redraw_undecided
    return reference_sampling.redraw_undecided


def apply_min_p(logits: Tensor, min_p: Tensor) -> None:
    """In place: drop tokens whose probability is below min_p * (the top token's probability)."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, max_top_k: int, top_p: Tensor | None) -> Tensor:
    """Keep the top_k largest logits (0 = all; ties at the k-th value are kept) and the smallest
    set of tokens whose probability reaches top_p (at least one). Returns the (maybe new) logits."""
    neg_inf = float("-inf")
    if top_p is None:
        if top_k is None:
            return logits
        # top-k only: a partial sort to the largest k is enough
        kth = logits.topk(max_top_k, dim=-1).values  # [N, max_k] descending
        idx = (top_k.clamp(min=1) - 1)[:, None]
        threshold = kth.gather(1, idx).masked_fill_((top_k == 0)[:, None], neg_inf)  # [N, 1]
        return logits.masked_fill_(logits < threshold, neg_inf)
    # the largest logits decide; the full sort only for rows whose kept set may reach past them
    return top_k_top_p_candidates(logits, top_k, max_top_k, top_p, top_k_top_p_sort)


def top_k_top_p_sort(logits: Tensor, top_k: Tensor | None, max_top_k: int, top_p: Tensor) -> Tensor:
    """apply_top_k_top_p by a full sort of the vocabulary (the rows the candidates cannot decide;
    the sampler's path before the candidates, kept as their oracle and for the benchmark)."""
    neg_inf = float("-inf")
    # full ascending sort: column V-1 is the largest
    sorted_logits, sorted_idx = logits.sort(dim=-1)
    vocab = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k == 0, vocab, top_k)
        threshold = sorted_logits.gather(1, (vocab - k)[:, None])  # the k-th largest, [N, 1]
        sorted_logits.masked_fill_(sorted_logits < threshold, neg_inf)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [N, V] ascending cumulative mass
    drop = cum <= (1.0 - top_p)[:, None]  # the low tail holding at most 1 - top_p of the mass
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, neg_inf)
    return logits.scatter_(-1, sorted_idx, sorted_logits)


def exponential_race(probs: Tensor, generators: dict[int, torch.Generator],
                     seeded: SeededDraws | None = None) -> Tensor:
    """argmax(probs / E), E ~ Exp(1): a categorical sample per row. probs [N, V] is overwritten."""
    q = torch.empty_like(probs)
    if len(generators) + (seeded.num_rows if seeded is not None else 0) < probs.shape[0]:
        q.exponential_()
    for row, gen in generators.items():  # seeded rows: their own stream, one [V] draw each
        q[row].exponential_(generator=gen)
    if seeded is not None:  # every counter-seeded row in one pass
        cols = torch.arange(probs.shape[1], device=probs.device).expand(seeded.num_rows, -1)
        q.index_copy_(0, seeded.rows, seeded.draw(seeded.seeds, cols))
    # E == 0 would turn a zero probability into 0/0 = nan, which argmax would pick
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def candidate_race(cands: Candidates, seeded: SeededDraws | None) -> Tensor:
    """The exponential race on the candidates alone (every row decided by them): the tokens
    outside have probability 0, and a seeded row's noise is drawn for the candidate tokens only,
    the same values the full-row draw gives them. Returns token ids [N]."""
    probs = cands.vals.softmax(dim=-1)  # [N, C]
    q = torch.empty_like(probs)
    if seeded is None or seeded.num_rows < probs.shape[0]:
        q.exponential_()
    if seeded is not None:
        q.index_copy_(0, seeded.rows, seeded.draw(seeded.seeds, cands.idx.index_select(0, seeded.rows)))
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    choice = probs.div_(q).argmax(dim=-1, keepdim=True)  # [N, 1]
    return cands.idx.gather(1, choice).squeeze(1)
