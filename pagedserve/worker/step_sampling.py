"""Sampling on the host's schedule: the steps that do not stay on the device (async_output.py).

For the S requests that sample in a step (HostInputs.sample_req_ids, in plan order):

    logits [S, vocab] float32  = compute_logits(hidden[sample_rows])   (or the decode graph's)
      -> seeded rows: noise drawn from (seed, number of tokens generated so far), one batched pass
      -> structured rows: the engine core's bitmask (plan.grammar) applied, -inf where disallowed
      -> Sampler (penalties, temperature, top-k/p, min-p, logprobs) -> one token per row

and the prompt logprobs of the requests that asked for them. The grammars themselves (and the
tokenizer they need) live in the engine core: the worker only applies the masks it is handed.
"""

from __future__ import annotations

from typing import Any

import torch

from pagedserve.core.outputs import GrammarOutput, LogprobsLists, ModelRunnerOutput, SchedulerOutput
from pagedserve.sampling_params import SamplingType
from pagedserve.structured_output import apply_token_bitmask
from pagedserve.worker.cuda_graphs import DecodeResult
from pagedserve.worker.device_copy import list_to_device
from pagedserve.worker.input_batch import HostInputs, RequestState
from pagedserve.worker.sampler import Sampler, SamplingMetadata, compute_prompt_logprobs
from pagedserve.worker.sampling_state import (
    PenaltyState,
    SeededDraws,
    TokenCounts,
    choose_seeded_kernel,
    profile_params,
)

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio odd constant, spreads (seed, step) pairs


class StepSampler:
    """Samples the rows of one launched step. `states` is the runner's own dict (shared)."""

    def __init__(self, model: Any, states: dict[str, RequestState], vocab_size: int,
                 device: torch.device, max_num_seqs: int = 256) -> None:
        self.model = model  # a CausalLM: compute_logits(hidden [N, hidden]) -> [N, vocab]
        self.states = states
        self.vocab_size = vocab_size
        self.device = device
        self.sampler = Sampler()
        self.penalties = PenaltyState(max_num_seqs, vocab_size, device)  # device token counts
        self.seeded_draw = choose_seeded_kernel(device)

    def _seeded(self, rows: list[int], seeds: list[int]) -> SeededDraws:
        index = list_to_device([rows, seeds], torch.int64, self.device)
        return SeededDraws(index[0], index[1], len(rows), self.seeded_draw)

    def profile(self, logits: torch.Tensor, max_logprobs: int) -> None:
        """The memory profile's sampler pass: logits [N, vocab] float32 (N = max_num_seqs) through
        the most expensive path, every row with every option, penalties read from the resident
        count tables. Zero logits are flat, so every value ties at the k-th: no row is decided by
        its candidates and every row takes the full-row redraw (the path's worst case)."""
        n = logits.shape[0]
        params = [profile_params(min(max_logprobs, self.vocab_size), self.vocab_size)] * n
        self.penalties.reserve()
        assert self.penalties.counts is not None
        counts = TokenCounts(self.penalties.counts, self.penalties.prompt_seen,  # type: ignore[arg-type]
                             torch.zeros(n, dtype=torch.int64, device=self.device), self.penalties.apply)
        meta = SamplingMetadata.build(
            params, [[0]] * n, [[0]] * n, [None] * n, [None] * n, self.vocab_size, self.device,
            token_counts=counts, seeded=self._seeded(list(range(n)), list(range(n))),
        )  # fmt: skip
        self.sampler(logits, meta)

    def sample(self, host: HostInputs, hidden: torch.Tensor, decoded: DecodeResult | None,
               grammar: GrammarOutput | None, output: ModelRunnerOutput) -> None:
        """Sample every request of host.sample_req_ids, append its token to its state and to
        `output` (with logprobs where asked)."""
        states = [self.states[r] for r in host.sample_req_ids]
        all_rows = len(host.sample_rows) == len(host.seq_lens) == host.query_start_loc[-1]
        if decoded is not None and grammar is None and all(s.plain_greedy for s in states):
            # The graph already took the argmax: one device-to-host copy and done.
            greedy = decoded.greedy
            if not all_rows:
                greedy = greedy[list_to_device(host.sample_rows, torch.long, greedy.device)]
            for state, token in zip(states, greedy.tolist()):
                state.output_token_ids.append(token)
                output.sampled_token_ids[state.req_id] = token
            return
        logits = self._logits(host, hidden, decoded)
        if grammar is not None:
            apply_grammar(logits, host.sample_req_ids, grammar)
        counts = None
        if any(s.sampling_params.has_penalties for s in states):
            counts = self.penalties.lookup(states, self.states)  # None: tables full, use the lists
        result = self.sampler(logits, self._metadata(states, counts))
        if any(s.sampling_params.has_penalties for s in states):  # also after a list fallback
            self.penalties.record(states, result.sampled_token_ids)
        for state, token, logprobs in zip(states, result.sampled_token_ids, result.logprobs):
            state.output_token_ids.append(token)
            output.sampled_token_ids[state.req_id] = token
            if logprobs is not None:
                output.logprobs[state.req_id] = logprobs

    def sample_on_device(self, host: HostInputs, hidden: torch.Tensor,
                         decoded: DecodeResult | None) -> torch.Tensor | None:  # fmt: skip
        """The sampled ids [S] int64 of host.sample_req_ids, left on the device (async scheduling:
        every row is RequestState.async_sampleable, so nothing of the draw needs the host), or
        None when a penalised row finds no room in the token-count tables (the caller samples
        synchronously, from the lists). Penalised rows' counts are recorded on the device."""
        states = [self.states[r] for r in host.sample_req_ids]
        penalised = any(s.sampling_params.has_penalties for s in states)
        counts = None
        if penalised:
            counts = self.penalties.lookup(states, self.states)
            if counts is None:
                return None
        sampled = self.sampler.draw(self._logits(host, hidden, decoded), self._metadata(states, counts))
        if penalised:
            self.penalties.record_on_device(states, sampled)
        return sampled

    def _logits(self, host: HostInputs, hidden: torch.Tensor, decoded: DecodeResult | None) -> torch.Tensor:
        """float32 logits [S, vocab] of the sampled rows, a tensor the sampler may edit."""
        if decoded is not None:
            # a copy either way: the sampler edits logits in place, the graph owns its buffer
            all_rows = len(host.sample_rows) == len(host.seq_lens) == host.query_start_loc[-1]
            return decoded.logits.clone() if all_rows else decoded.logits[
                list_to_device(host.sample_rows, torch.long, self.device)]
        rows = list_to_device(host.sample_rows, torch.long, self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))

    def _metadata(self, states: list[RequestState], counts: TokenCounts | None) -> SamplingMetadata:
        # Counter-based seeding: draw k of a seeded request depends only on (seed, k), so outputs
        # survive preemption and do not depend on the rest of the batch; all seeded rows of the
        # step are drawn in one pass (SeededDraws), not one generator call each. k counts the
        # tokens still in flight (async scheduling) as well as those held.
        seeded_rows: list[int] = []
        step_seeds: list[int] = []
        for row, state in enumerate(states):
            seed = state.sampling_params.seed
            if seed is not None and state.sampling_params.sampling_type == SamplingType.RANDOM_SEED:
                seeded_rows.append(row)
                k = len(state.output_token_ids) + state.num_pending
                step_seeds.append((seed * _SEED_MIX + k) % (1 << 63))
        seeded = self._seeded(seeded_rows, step_seeds) if seeded_rows else None
        return SamplingMetadata.build(
            params=[s.sampling_params for s in states],
            prompt_token_ids=[s.prompt_token_ids for s in states],
            output_token_ids=[s.output_token_ids for s in states],
            generators=[None] * len(states),
            eos_token_ids=[s.eos_token_id for s in states],
            vocab_size=self.vocab_size,
            device=self.device,
            token_counts=counts,
            seeded=seeded,
        )

    def prompt_logprobs(self, plan: SchedulerOutput, host: HostInputs, hidden: torch.Tensor,
                        output: ModelRunnerOutput) -> None:
        """Rows for prompt positions p in this chunk with p + 1 < prompt length: the logits at p
        score prompt token p + 1. The LM head runs on at most max_num_seqs rows at a time, the
        logits size the memory profile measured (a chunk may hold max_num_batched_tokens rows)."""
        step = self.penalties.max_rows
        for index, (req_id, num) in enumerate(plan.num_scheduled_tokens.items()):
            state = self.states[req_id]
            num_logprobs = state.sampling_params.prompt_logprobs
            if num_logprobs is None:
                continue
            start = state.num_computed_tokens  # the chunk's start (from the plan)
            end = min(start + num, len(state.prompt_token_ids) - 1)
            if end <= start:
                continue
            first = host.query_start_loc[index]
            result = LogprobsLists([], [], [])
            for lo in range(start, end, step):
                hi = min(lo + step, end)
                logits = self.model.compute_logits(hidden[first + lo - start : first + hi - start])
                targets = torch.tensor(
                    state.prompt_token_ids[lo + 1 : hi + 1], dtype=torch.long, device=self.device
                )
                result.extend(compute_prompt_logprobs(logits, targets, num_logprobs))
            output.prompt_logprobs[req_id] = result


def apply_grammar(logits: torch.Tensor, sample_req_ids: list[str], grammar: GrammarOutput) -> None:
    """Mask logits [S, vocab] (row i samples for sample_req_ids[i]) with the engine core's
    bitmask [G, words], G <= S, whose row j belongs to grammar.req_ids[j]. xgrammar indexes the
    logits and the bitmask with the same row numbers, so a compact bitmask is first spread to S
    rows (all ones = nothing masked) unless its rows already are the logits' first G rows.

        logits rows   0   1   2   3            grammar.req_ids = [c, a]
        sample ids    a   b   c   d     ->     rows = [2, 0]; full[2] = bitmask[0], full[0] = bitmask[1]
    """
    row_of = {req_id: row for row, req_id in enumerate(sample_req_ids)}
    rows = [row_of[req_id] for req_id in grammar.req_ids]  # KeyError: the plan and worker disagree
    # the plan's raw bytes -> [G, num_words] int32 (bytearray: a writable buffer for torch)
    bitmask = torch.frombuffer(bytearray(grammar.bitmask), dtype=torch.int32).view(len(rows), grammar.num_words)
    if rows != list(range(len(rows))):
        full = torch.full((len(sample_req_ids), grammar.num_words), -1, dtype=torch.int32)
        full[torch.tensor(rows, dtype=torch.long)] = bitmask
        bitmask = full
    apply_token_bitmask(logits, bitmask, rows)
