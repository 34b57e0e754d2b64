"""Persistent sampling state on the device: token counts for penalties, updated by diffs.

Rebuilding the penalties' inputs from Python lists costs a pass over every prompt and output token
of every penalised row, every step (SamplingMetadata.build's ragged lists). Instead each request
with a penalty holds one slot of two device tables for its lifetime:

    counts      [R, V] int32   counts[slot, t] = occurrences of t in the request's output
    prompt_seen [R, V] bool    prompt_seen[slot, t] = t occurs in its prompt

    request arrives (or resumes)  -> a free slot; its row filled once from its token lists
    each sampled token t          -> counts[slot, t] += 1   (one batched index_put on the device)
    request finished / replaced   -> the slot is reclaimed lazily, when the free list runs dry

R = max_num_seqs. The tables are allocated on first use, or by reserve() during the memory profile
(GPU), so that the KV budget is measured with them resident. A slot belongs to one RequestState
object: a request resumed after preemption arrives as a new state and gets a fresh, rebuilt slot.
When no slot is free (more penalised states than R), the step falls back to the ragged lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pagedserve.kernels import reference_sampling
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.device_copy import list_to_device
from pagedserve.worker.input_batch import RequestState

PenaltyFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool], None]


def choose_penalty_kernel(device: torch.device) -> PenaltyFn:
    """The Triton kernel on CUDA when triton is installed, the torch twin otherwise (chosen once)."""
    if device.type == "cuda":
        from pagedserve.kernels.registry import triton_available

        if triton_available():
            from pagedserve.kernels.triton.sampling import apply_penalties_from_counts

            return apply_penalties_from_counts
    return reference_sampling.apply_penalties_from_counts


SeededFn = Callable[[Tensor, Tensor], Tensor]  # seeds [S], token ids [S, M] -> E [S, M]


def choose_seeded_kernel(device: torch.device) -> SeededFn:
    """Counter-based seeded exponential draws: Triton on CUDA when installed, else the twin."""
    if device.type == "cuda":
        from pagedserve.kernels.registry import triton_available

        if triton_available():
            from pagedserve.kernels.triton.sampling import seeded_exponential

            return seeded_exponential
    return reference_sampling.seeded_exponential


@dataclass(slots=True)
class SeededDraws:
    """The seeded rows of one step drawn in one batched pass (SamplingMetadata.seeded)."""

    rows: Tensor  # [S] int64 rows of the batch
    seeds: Tensor  # [S] int64 step seeds (a function of the request's seed and token index)
    num_rows: int  # S
    draw: SeededFn  # seeds [S], token ids [S, M] -> E [S, M] float32


@dataclass(slots=True)
class TokenCounts:
    """One step's view of the tables for the N sampled rows (SamplingMetadata.token_counts)."""

    counts: Tensor  # [R, V] int32
    prompt_seen: Tensor  # [R, V] bool
    slots: Tensor  # [N] int64; 0 for rows without a penalty (their penalties are neutral)
    apply: PenaltyFn


class PenaltyState:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = device
        self.apply = choose_penalty_kernel(device)
        self.counts: Tensor | None = None
        self.prompt_seen: Tensor | None = None
        self.owner: list[RequestState | None] = [None] * max_rows
        self.free = list(range(max_rows - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def nbytes(self) -> int:
        return self.max_rows * self.vocab_size * (4 + 1)

    def reserve(self) -> None:
        if self.counts is None:
            shape = (self.max_rows, self.vocab_size)
            self.counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self.prompt_seen = torch.zeros(shape, dtype=torch.bool, device=self.device)

    def _reclaim(self, live: dict[str, RequestState]) -> None:
        for slot, state in enumerate(self.owner):
            if state is not None and live.get(state.req_id) is not state:
                self.owner[slot] = None
                state.penalty_slot = -1
                self.free.append(slot)

    def _fill(self, slot: int, state: RequestState) -> None:
        assert self.counts is not None and self.prompt_seen is not None
        self.prompt_seen[slot].zero_()
        self.counts[slot].zero_()
        if state.prompt_token_ids:
            prompt = list_to_device(state.prompt_token_ids, torch.int64, self.device)
            self.prompt_seen[slot, prompt] = True
        if state.output_token_ids:
            out = list_to_device(state.output_token_ids, torch.int64, self.device)
            self.counts[slot].index_put_((out,), torch.ones_like(out, dtype=torch.int32), accumulate=True)

    def lookup(self, states: list[RequestState], live: dict[str, RequestState]) -> TokenCounts | None:
        """Slots for the rows of one step (assigning and filling new ones), or None when the
        tables cannot hold every penalised row (the caller uses the ragged lists)."""
        self.reserve()
        assert self.counts is not None and self.prompt_seen is not None
        need = [s for s in states if s.sampling_params.has_penalties and s.penalty_slot < 0]
        if len(need) > len(self.free):
            self._reclaim(live)
            if len(need) > len(self.free):
                return None
        for state in need:
            slot = self.free.pop()
            self.owner[slot] = state
            state.penalty_slot = slot
            self._fill(slot, state)
        slots = [max(s.penalty_slot, 0) if s.sampling_params.has_penalties else 0 for s in states]
        slots_t = list_to_device(slots, torch.int64, self.device)
        return TokenCounts(self.counts, self.prompt_seen, slots_t, self.apply)

    def record_on_device(self, states: list[RequestState], sampled: torch.Tensor) -> None:
        """record() with the tokens still on the device: sampled [len(states)] int64."""
        assert self.counts is not None
        rows = [i for i, s in enumerate(states) if s.penalty_slot >= 0]
        if not rows:
            return
        index = list_to_device([rows, [states[i].penalty_slot for i in rows]], torch.int64, self.device)
        ones = torch.ones(len(rows), dtype=torch.int32, device=self.device)
        self.counts.index_put_((index[1], sampled.index_select(0, index[0])), ones, accumulate=True)

    def record(self, states: list[RequestState], tokens: list[int]) -> None:
        """counts[slot, token] += 1 for the penalised rows that just sampled `tokens`."""
        assert self.counts is not None
        pairs = [(s.penalty_slot, t) for s, t in zip(states, tokens) if s.penalty_slot >= 0]
        if not pairs:
            return
        index = list_to_device(pairs, torch.int64, self.device)
        ones = torch.ones(len(pairs), dtype=torch.int32, device=self.device)
        self.counts.index_put_((index[:, 0], index[:, 1]), ones, accumulate=True)


def profile_params(max_logprobs: int, vocab_size: int) -> SamplingParams:
    """The sampler's most expensive path, for the memory profile: every option that allocates
    [N, V] buffers at once (penalties, min-p, top-k with top-p, logprobs at the maximum, a seed).
    top_k stays below the vocabulary (k >= V would switch it off)."""
    return SamplingParams(
        temperature=0.7, top_p=0.9, top_k=max(min(50, vocab_size - 1), 1), min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.1, frequency_penalty=0.1, logprobs=max_logprobs, seed=0,
    )  # fmt: skip
