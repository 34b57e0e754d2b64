"""Batched sampling over the logits of the N rows that sample in one step.

Order of operations (as vLLM):

    raw logprobs = log_softmax(logits)               (only rows that asked for logprobs)
    logit_bias, min_tokens masking                   (change the argmax: applied to greedy rows too)
    penalties: repetition (prompt+output), presence and frequency (output only)
    greedy rows  -> argmax
    random rows  -> / temperature -> min_p -> top_k / top_p -> softmax -> exponential race

The exponential race: argmax(p / E) with E ~ Exponential(1) i.i.d. picks token i with probability
p_i. Seeded rows draw E from their own torch.Generator (one [vocab] draw per sampled token), or,
in the engine, all at once from a counter-based hash of (step seed, token) (`seeded`,
reference_sampling.seeded_exponential): either way a seeded request's tokens do not depend on the
rest of the batch; the other rows share one batched draw from the default generator.

Every tensor field of SamplingMetadata is None when no row needs it, and the sampler skips the work.
Penalties read either the ragged token lists (build's default) or, in the engine, the persistent
device token counts of worker/sampling_state.py (`token_counts`); top-k / top-p decide on the
largest logits only and sort the full vocabulary only for rows that need it (reference_sampling.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagedserve.core.outputs import LogprobsLists
from pagedserve.kernels.reference_sampling import row_seeds, select_candidates
from pagedserve.sampling_params import SamplingParams, SamplingType
from pagedserve.worker.device_copy import list_to_device
from pagedserve.worker.sample_draw import (
    apply_min_p,
    apply_top_k_top_p,
    candidate_race,
    choose_redraw_kernel,
    exponential_race,
    top_k_top_p_sort,
)

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata", "apply_min_p", "apply_penalties",
           "apply_top_k_top_p", "compute_prompt_logprobs", "make_generator", "top_k_top_p_sort"]

if TYPE_CHECKING:
    from pagedserve.worker.sampling_state import SeededDraws, TokenCounts


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """The per-request generator of a seeded request (the model runner keeps it across steps)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _flatten(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Ragged token lists -> (row index [M], token id [M]) int64, M = total length."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    row_idx = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int64), lengths)
    tokens = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.int64)
    return row_idx.to(device, non_blocking=True), tokens.to(device, non_blocking=True)


@dataclass(slots=True)
class SamplingMetadata:
    """Per-step sampling state of the N rows that sample, as tensors on the logits' device."""

    num_rows: int
    all_greedy: bool
    all_random: bool
    greedy_mask: Tensor | None  # [N] bool; None when all rows are greedy or all random
    temperature: Tensor | None  # [N] float32, greedy rows hold 1.0; None when all greedy
    min_p: Tensor | None  # [N] float32, 0 = off
    top_k: Tensor | None  # [N] int64, 0 = off
    max_top_k: int  # max over top_k (0 when top_k is None)
    top_p: Tensor | None  # [N] float32, 1 = off
    # penalties: [N] float32 each, None when no row has any penalty
    presence_penalties: Tensor | None
    frequency_penalties: Tensor | None
    repetition_penalties: Tensor | None
    # Ragged token ids as (row [M], token [M]) pairs; output tokens when any penalty is on,
    # prompt tokens only when a repetition penalty is on.
    output_tokens: tuple[Tensor, Tensor] | None
    prompt_tokens: tuple[Tensor, Tensor] | None
    # Sparse additive bias / -inf mask as (row [M], token [M]) and values [M]
    logit_bias: tuple[Tensor, Tensor, Tensor] | None
    min_tokens_mask: tuple[Tensor, Tensor] | None
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # seeded random rows
    num_logprobs: list[int | None] = field(default_factory=list)  # per row
    logprob_rows: Tensor | None = None  # [L] int64 rows that asked for logprobs
    logprob_row_list: list[int] = field(default_factory=list)  # the same rows on the host
    max_num_logprobs: int = 0
    # penalties from the persistent device tables instead of output_tokens / prompt_tokens
    token_counts: TokenCounts | None = None
    apply_repetition: bool = False  # some row has repetition_penalty != 1
    seeded: SeededDraws | None = None  # seeded rows drawn by counter instead of `generators`
    top_k_everywhere: bool = False  # every random row has top_k > 0 (host knowledge: no sync)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        eos_token_ids: list[int | None],
        vocab_size: int,
        device: torch.device,
        token_counts: TokenCounts | None = None,
        seeded: SeededDraws | None = None,
    ) -> SamplingMetadata:
        """`seeded`: the seeded rows' counter-based draws; those rows need no generator."""
        n = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == len(eos_token_ids) == n):
            raise ValueError("SamplingMetadata.build: all per-row lists must have the same length")

        def f32(values: list[float]) -> Tensor:
            return list_to_device(values, torch.float32, device)

        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)

        temperature = (
            None if all_greedy else f32([1.0 if g else p.temperature for p, g in zip(params, greedy)])
        )
        min_p = f32([p.min_p for p in params]) if any(p.min_p > 0.0 for p in params) else None
        # top_k >= vocab keeps every token: treat it as off
        ks = [p.top_k if p.top_k < vocab_size else 0 for p in params]
        top_k = list_to_device(ks, torch.int64, device) if any(ks) else None
        top_p = f32([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None

        presence = frequency = repetition = None
        output_tokens = prompt_tokens = None
        apply_repetition = any(p.repetition_penalty != 1.0 for p in params)
        if any(p.has_penalties for p in params):
            presence = f32([p.presence_penalty for p in params])
            frequency = f32([p.frequency_penalty for p in params])
            repetition = f32([p.repetition_penalty for p in params])
            if token_counts is None:
                output_tokens = _flatten(output_token_ids, device)
                if apply_repetition:
                    prompt_tokens = _flatten(prompt_token_ids, device)
        else:
            token_counts = None

        bias_rows: list[int] = []
        bias_cols: list[int] = []
        bias_vals: list[float] = []
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for i, p in enumerate(params):
            if p.logit_bias:
                for tok, val in p.logit_bias.items():
                    if 0 <= tok < vocab_size:  # out-of-vocab ids are rejected upstream; never index with them
                        bias_rows.append(i)
                        bias_cols.append(tok)
                        bias_vals.append(val)
            if len(output_token_ids[i]) < p.min_tokens:
                stops = set(p.all_stop_token_ids)
                if eos_token_ids[i] is not None:
                    stops.add(eos_token_ids[i])  # type: ignore[arg-type]
                for tok in stops:
                    if 0 <= tok < vocab_size:
                        mask_rows.append(i)
                        mask_cols.append(tok)

        def i64(values: list[int]) -> Tensor:
            return list_to_device(values, torch.int64, device)

        logit_bias = (i64(bias_rows), i64(bias_cols), f32(bias_vals)) if bias_rows else None
        min_tokens_mask = (i64(mask_rows), i64(mask_cols)) if mask_rows else None

        gens: dict[int, torch.Generator] = {}
        for i, (p, g) in enumerate(zip(params, generators)):
            if p.sampling_type == SamplingType.RANDOM_SEED and seeded is None:
                if g is None:
                    raise ValueError(f"row {i} has seed={p.seed} but no generator (use make_generator)")
                gens[i] = g

        num_logprobs = [p.logprobs for p in params]
        rows = [i for i, k in enumerate(num_logprobs) if k is not None]
        max_num_logprobs = min(max((num_logprobs[i] or 0 for i in rows), default=0), vocab_size)

        return cls(
            num_rows=n,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=None if all_greedy or all_random else list_to_device(greedy, torch.bool, device),
            temperature=temperature,
            min_p=min_p,
            top_k=top_k,
            max_top_k=max(ks),
            top_p=top_p,
            presence_penalties=presence,
            frequency_penalties=frequency,
            repetition_penalties=repetition,
            output_tokens=output_tokens,
            prompt_tokens=prompt_tokens,
            logit_bias=logit_bias,
            min_tokens_mask=min_tokens_mask,
            generators=gens,
            num_logprobs=num_logprobs,
            logprob_rows=i64(rows) if rows else None,
            logprob_row_list=rows,
            max_num_logprobs=max_num_logprobs,
            token_counts=token_counts,
            apply_repetition=apply_repetition,
            seeded=seeded,
            top_k_everywhere=top_k is not None and all(k > 0 for k, g in zip(ks, greedy) if not g),
        )


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: list[int]  # len N
    logprobs: list[LogprobsLists | None]  # per row, one position each; None if not asked


def _token_mask(rows_tokens: tuple[Tensor, Tensor], shape: torch.Size, counts: bool) -> Tensor:
    """[N, V] occurrence counts (float32) or presence mask (bool) of ragged token lists."""
    rows, tokens = rows_tokens
    out = torch.zeros(shape, dtype=torch.float32, device=rows.device)
    out.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
    return out if counts else out > 0


def apply_penalties(logits: Tensor, meta: SamplingMetadata) -> None:
    """In place. Repetition (HF/vLLM): tokens seen in prompt or output get positive logits divided
    and negative ones multiplied by the penalty; presence/frequency (OpenAI): subtract
    presence * [seen in output] + frequency * count in output."""
    assert meta.presence_penalties is not None and meta.frequency_penalties is not None
    assert meta.repetition_penalties is not None
    tc = meta.token_counts
    if tc is not None:  # the same formula on the persistent device counts
        tc.apply(logits, tc.counts, tc.prompt_seen, tc.slots, meta.repetition_penalties,
                 meta.frequency_penalties, meta.presence_penalties, meta.apply_repetition)
        return
    assert meta.output_tokens is not None
    out_counts = _token_mask(meta.output_tokens, logits.shape, counts=True)  # [N, V]
    out_seen = out_counts > 0
    if meta.prompt_tokens is not None:
        seen = out_seen | _token_mask(meta.prompt_tokens, logits.shape, counts=False)
        rep = meta.repetition_penalties[:, None].expand_as(logits)
        penalty = torch.where(seen, rep, torch.ones_like(logits))
        logits.mul_(torch.where(logits > 0, penalty.reciprocal(), penalty))
    logits.sub_(meta.frequency_penalties[:, None] * out_counts)
    logits.sub_(meta.presence_penalties[:, None] * out_seen)


def _logprob_tensors(raw: Tensor, chosen: Tensor, k_max: int) -> tuple[Tensor, Tensor, Tensor]:
    """raw [L, V] logprobs, chosen [L] -> ids [L, 1 + k_max] int64 (chosen, then the top-k),
    their logprobs [L, 1 + k_max] float32, the chosen token's rank [L] int64 (on raw's device)."""
    chosen_lp = raw.gather(1, chosen[:, None])  # [L, 1]
    ranks = (raw >= chosen_lp).sum(dim=-1)  # ties count against the chosen token, as vLLM
    ids, lps = chosen[:, None], chosen_lp
    if k_max > 0:
        top = raw.topk(k_max, dim=-1)
        ids = torch.cat([ids, top.indices], dim=1)
        lps = torch.cat([lps, top.values], dim=1)
    return ids, lps, ranks


def _logprobs_lists(raw: Tensor, chosen: Tensor, k_max: int) -> tuple[list, list, list]:
    """_logprob_tensors as host lists."""
    ids, lps, ranks = _logprob_tensors(raw, chosen, k_max)
    return ids.tolist(), lps.tolist(), ranks.tolist()


@dataclass(slots=True)
class SampledLogprobs:
    """The sampled tokens' logprobs of the L rows that asked, still where they were computed
    (async scheduling reads them back with the tokens). Row j of the tensors is batch row rows[j]."""

    rows: list[int]  # [L] batch rows, ascending
    widths: list[int]  # [L] 1 + the number of top logprobs row j asked for (capped)
    token_ids: Tensor  # [L, 1 + max_num_logprobs] int64
    logprobs: Tensor  # [L, 1 + max_num_logprobs] float32
    ranks: Tensor  # [L] int64

    def per_row(self, num_rows: int, token_ids: list[list[int]], logprobs: list[list[float]],
                ranks: list[int]) -> list[LogprobsLists | None]:  # fmt: skip
        """The lists (the three tensors' values, read back) as one LogprobsLists per batch row
        of num_rows, None for the rows that did not ask."""
        out: list[LogprobsLists | None] = [None] * num_rows
        for j, row in enumerate(self.rows):
            width = self.widths[j]
            out[row] = LogprobsLists([token_ids[j][:width]], [logprobs[j][:width]], [ranks[j]])
        return out


def compute_prompt_logprobs(logits: Tensor, target_token_ids: Tensor, num_logprobs: int) -> LogprobsLists:
    """logits [P, V] for P consecutive prompt positions, targets [P] (the next prompt tokens).

    Raw log_softmax of the model's logits; row i: [target] + top-k ids, their logprobs, rank."""
    raw = logits.float().log_softmax(dim=-1)
    ids, lps, ranks = _logprobs_lists(raw, target_token_ids.to(torch.int64), min(num_logprobs, raw.shape[-1]))
    return LogprobsLists(token_ids=ids, logprobs=lps, ranks=ranks)


class Sampler:
    # the truncation step (a class attribute: benchmarks/sampler_bench.py swaps in the full sort)
    top_k_top_p = staticmethod(apply_top_k_top_p)
    # sample on the candidates when every row is decided by them (no per-row generators)
    compact = True

    def _truncate_and_draw(self, logits: Tensor, meta: SamplingMetadata) -> Tensor:
        """top-k / top-p, then one categorical draw per row [N]: every row on its candidates,
        then the random rows they do not decide redrawn over the full row (on the GPU without a
        host sync: the draw stays queued behind the forward). With per-row generators, or
        compact off: the full-row form."""
        truncates = meta.top_k is not None or meta.top_p is not None
        if self.compact and truncates and not meta.generators:
            cands = select_candidates(logits, meta.top_k, meta.max_top_k, meta.top_p,
                                      top_k_everywhere=meta.top_k_everywhere)
            sampled = candidate_race(cands, meta.seeded)
            decided = cands.decided if meta.greedy_mask is None else cands.decided | meta.greedy_mask
            seeded = meta.seeded
            seeds = row_seeds(meta.num_rows, seeded.rows if seeded else None, seeded.seeds if seeded else None,
                              logits.device)
            choose_redraw_kernel(logits.device.type)(sampled, logits, ~decided, meta.top_k, meta.top_p, seeds)
            return sampled
        logits = self.top_k_top_p(logits, meta.top_k, meta.max_top_k, meta.top_p)
        return exponential_race(logits.softmax(dim=-1), meta.generators, meta.seeded)

    def __call__(self, logits: Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits [N, vocab] float32, modified in place. Returns one token (and logprobs) per row."""
        sampled, logprobs = self.draw_with_logprobs(logits, meta)
        out_logprobs: list[LogprobsLists | None] = [None] * meta.num_rows
        if logprobs is not None:
            out_logprobs = logprobs.per_row(meta.num_rows, logprobs.token_ids.tolist(), logprobs.logprobs.tolist(),
                                            logprobs.ranks.tolist())
        return SamplerOutput(sampled_token_ids=sampled.tolist(), logprobs=out_logprobs)

    def draw(self, logits: Tensor, meta: SamplingMetadata) -> Tensor:
        """The sampled ids [N] int64, left on the logits' device (nothing read back: async
        scheduling's launch uses this). logits [N, vocab] float32, modified in place."""
        return self._draw(logits, meta)

    def draw_with_logprobs(self, logits: Tensor, meta: SamplingMetadata) -> tuple[Tensor, SampledLogprobs | None]:
        """draw(), and the logprobs of the rows that asked for them, both left on the device
        (None when no row asked). The logprobs are the raw model's (before any processing), as
        vLLM returns them."""
        if logits.dtype != torch.float32:
            logits = logits.float()
        raw_logprobs = None
        if meta.logprob_rows is not None:  # before any processing: vLLM returns raw logprobs
            raw_logprobs = logits[meta.logprob_rows].log_softmax(dim=-1)  # [L, V], a copy
        sampled = self._draw(logits, meta)
        if raw_logprobs is None:
            return sampled, None
        assert meta.logprob_rows is not None
        ids, lps, ranks = _logprob_tensors(raw_logprobs, sampled[meta.logprob_rows], meta.max_num_logprobs)
        rows = meta.logprob_row_list
        widths = [1 + min(meta.num_logprobs[row] or 0, meta.max_num_logprobs) for row in rows]
        return sampled, SampledLogprobs(rows, widths, ids, lps, ranks)

    def _draw(self, logits: Tensor, meta: SamplingMetadata) -> Tensor:
        if logits.dtype != torch.float32:
            logits = logits.float()
        if meta.logit_bias is not None:
            rows, cols, vals = meta.logit_bias
            logits.index_put_((rows, cols), vals, accumulate=True)
        if meta.min_tokens_mask is not None:
            logits.index_put_(meta.min_tokens_mask, logits.new_full((), float("-inf")))
        if meta.repetition_penalties is not None:
            apply_penalties(logits, meta)

        greedy = None if meta.all_random else logits.argmax(dim=-1)
        if meta.all_greedy:
            assert greedy is not None
            sampled = greedy
        else:
            assert meta.temperature is not None
            logits.div_(meta.temperature[:, None])
            if meta.min_p is not None:
                apply_min_p(logits, meta.min_p)
            sampled = self._truncate_and_draw(logits, meta)
            if greedy is not None:
                assert meta.greedy_mask is not None
                sampled = torch.where(meta.greedy_mask, greedy, sampled)
        return sampled
