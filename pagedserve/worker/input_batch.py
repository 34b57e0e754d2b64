"""The worker's per-request state and the staging of one step's inputs from the plan.

The worker keeps a small state per running request (its tokens, block table and sampling
parameters) so that the scheduler only sends diffs. Inputs of one step, for B requests packed
back to back (T tokens in all):

    input_ids, positions, slot_mapping : [T]
    query_start_loc                    : [B+1]   request i's tokens are [qsl[i], qsl[i+1])
    seq_lens                           : [B]     context after this step = computed + scheduled
    block_tables                       : [B, max_blocks], padded with 0

    slot of position p = block_table[p // block_size] * block_size + p % block_size

num_computed_tokens has one writer, the plan: every scheduled request arrives in the plan either
whole (NewRequestData) or as a diff (CachedRequestData), both carrying its num_computed_tokens at
the start of this step, and update_states copies it. The worker never advances it itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedserve.core.outputs import SchedulerOutput
from pagedserve.core.request import token_slice
from pagedserve.model_executor.layers.attention import AttentionMetadata
from pagedserve.sampling_params import SamplingParams, SamplingType
from pagedserve.worker.device_copy import list_to_device


@dataclass(slots=True)
class RequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # from the plan only (see the module docstring)
    eos_token_id: int | None
    generator: torch.Generator | None = field(default=None)  # unused by the engine (kept for callers)
    # Greedy with nothing that edits logits or reads them (no logprobs, bias, min_tokens,
    # penalties, structured outputs): the decode graph's argmax is this request's token.
    plain_greedy: bool = False
    device_sampled: bool = False  # samples_without_host_state(sampling_params)
    num_pending: int = 0  # sampled by a launched step, not yet collected (0 or 1)
    penalty_slot: int = -1  # its row of the token-count tables (sampling_state.py); -1 = none

    @property
    def async_sampleable(self) -> bool:
        """This step's token can be drawn without the tokens still in flight on the host: plain
        greedy, or device-sampled past min_tokens (the EOS mask reads the count of tokens held)
        and, with penalties, a token-count row that is already current."""
        if self.plain_greedy:
            return True
        p = self.sampling_params
        if not self.device_sampled or p.min_tokens > len(self.output_token_ids):
            return False
        # a penalised request without a table row gets one filled from its token lists, which
        # must then hold every token: none in flight
        return not p.has_penalties or self.penalty_slot >= 0 or self.num_pending == 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        return token_slice(self.prompt_token_ids, self.output_token_ids, start, end)

    def token_at(self, index: int) -> int:
        prompt_len = len(self.prompt_token_ids)
        if index < prompt_len:
            return self.prompt_token_ids[index]
        return self.output_token_ids[index - prompt_len]


def samples_without_host_state(params: SamplingParams) -> bool:
    """Its token can be drawn on the device with nothing read back to the host: no logprobs and
    no structured outputs (the matcher takes each token before the next mask). Penalties read
    the device token-count tables, which record the drawn ids on the device; min_tokens and a
    penalty table row still to fill are checked per step (RequestState.async_sampleable), as
    they read the tokens so far. Async scheduling launches such steps without waiting for ids."""
    return params.logprobs is None and params.structured_outputs is None


def is_plain_greedy(params: SamplingParams) -> bool:
    return (params.sampling_type == SamplingType.GREEDY and params.logprobs is None
            and not params.logit_bias and params.min_tokens == 0 and not params.has_penalties
            and params.structured_outputs is None)


@dataclass(slots=True)
class HostInputs:
    """One step's inputs as host lists (layout in the module docstring)."""

    token_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T]
    slots: list[int] = field(default_factory=list)  # [T]
    query_start_loc: list[int] = field(default_factory=lambda: [0])  # [B+1]
    seq_lens: list[int] = field(default_factory=list)  # [B]
    tables: list[list[int]] = field(default_factory=list)  # [B][blocks of request b]
    max_query_len: int = 0
    max_blocks: int = 0
    sample_req_ids: list[str] = field(default_factory=list)  # [S], S <= B, in plan order
    sample_rows: list[int] = field(default_factory=list)  # [S] index into the packed tokens
    # (index into the packed tokens, req_id, position) of inputs the previous step samples
    placeholders: list[tuple[int, str, int]] = field(default_factory=list)


def update_states(states: dict[str, RequestState], plan: SchedulerOutput, device: torch.device) -> None:
    """Forget finished requests, add new (or resumed) ones whole, apply the running ones' diffs."""
    for req_id in plan.finished_req_ids:
        states.pop(req_id, None)
    for new in plan.scheduled_new_reqs:
        params = new.sampling_params
        states[new.req_id] = RequestState(
            req_id=new.req_id,
            prompt_token_ids=list(new.prompt_token_ids),
            output_token_ids=list(new.output_token_ids),
            sampling_params=params,
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            eos_token_id=new.eos_token_id,
            # seeded draws are counter-based (step_sampling.py): no per-request generator
            plain_greedy=is_plain_greedy(params),
            device_sampled=samples_without_host_state(params),
        )
    for cached in plan.scheduled_cached_reqs:
        state = states[cached.req_id]
        state.block_ids.extend(cached.new_block_ids)
        state.num_computed_tokens = cached.num_computed_tokens


def prepare_inputs(states: dict[str, RequestState], plan: SchedulerOutput, block_size: int) -> HostInputs:
    """The step's host inputs. A request samples when the step catches up with every token it
    knows plus the one pending (end == known + pending); its input at the position of a token
    that the step in flight samples (end > known) is a placeholder, filled on the device."""
    bs = block_size
    host = HostInputs()
    qsl = host.query_start_loc
    for req_id, num in plan.num_scheduled_tokens.items():
        state = states[req_id]
        start = state.num_computed_tokens
        end = start + num
        table = state.block_ids
        known = state.num_tokens
        if end > known:  # the position of the token the step in flight samples: see model_runner
            assert start == known and state.num_pending == 1, (req_id, start, known)
            host.placeholders.append((len(host.token_ids), req_id, start))
            host.token_ids.append(0)
            host.positions.append(start)
            host.slots.append(table[start // bs] * bs + start % bs)
        elif num == 1:  # decode: skip the generic range machinery
            host.token_ids.append(state.token_at(start))
            host.positions.append(start)
            host.slots.append(table[start // bs] * bs + start % bs)
        else:
            host.token_ids.extend(state.token_ids(start, end))
            host.positions.extend(range(start, end))
            host.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        qsl.append(qsl[-1] + num)
        host.seq_lens.append(end)
        host.tables.append(table)
        host.max_query_len = max(host.max_query_len, num)
        host.max_blocks = max(host.max_blocks, len(table))
        if end == known + state.num_pending:  # caught up with every token: sample the next
            host.sample_req_ids.append(req_id)
            host.sample_rows.append(qsl[-1] - 1)
    return host


def to_device(host: HostInputs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """The eager path's tensors: input_ids, positions [T] int64 and the attention metadata."""

    def copy(values: list, dtype: torch.dtype) -> torch.Tensor:
        return list_to_device(values, dtype, device)

    width = host.max_blocks
    padded = [t + [0] * (width - len(t)) for t in host.tables]
    metadata = AttentionMetadata(
        slot_mapping=copy(host.slots, torch.long),
        query_start_loc=copy(host.query_start_loc, torch.int32),
        seq_lens=copy(host.seq_lens, torch.int32),
        block_tables=copy(padded, torch.int32),
        max_query_len=host.max_query_len,
        max_seq_len=max(host.seq_lens),
    )
    return copy(host.token_ids, torch.long), copy(host.positions, torch.long), metadata
