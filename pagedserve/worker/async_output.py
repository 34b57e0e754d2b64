"""Async scheduling's output side: steps whose sampled ids stay on the device until collected.

When every request a step samples is plain greedy, or draws its token with nothing read back
(RequestState.async_sampleable: random or seeded sampling with temperature, top-k/top-p/min-p and
logit bias, past min_tokens; no logprobs, penalties or grammar), and none wants prompt logprobs,
the runner's launch only enqueues the work: the sampled ids [S] int64 (the argmax, or the
sampler's draw) stay on the device (and are copied to a pinned host buffer behind a CUDA event)
until collect. The engine may launch step n+1 in between;
a request's input at the position of its token from step n (a "placeholder", not yet known on
the host) is then taken on the device from step n's sampled ids:

    host input_ids   [t0, t1, 0, t3]          0 where the placeholder goes
    device           input_ids[2] = sampled_n[row of that request in step n]   (before the forward)

Any other step samples at launch; it first resolves every step still in flight, so that tokens
reach each request's state in launch order (invariant: `unresolved` is in launch order, and a
state's output_token_ids only ever grows from the oldest unresolved step forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pagedserve.core.outputs import ModelRunnerOutput
from pagedserve.worker.cuda_graphs import DecodeResult
from pagedserve.worker.device_copy import list_to_device
from pagedserve.worker.input_batch import HostInputs, RequestState


@dataclass(slots=True)
class StepHandle:
    """A launched step. `output` is set once its tokens are on the host (at launch for a
    synchronous step); until then `sampled` [S] int64 holds them on the device, and `host`
    receives them behind `ready`."""

    output: ModelRunnerOutput | None = None
    sampled: torch.Tensor | None = None
    host: torch.Tensor | None = None  # pinned [>= S] int64 (CUDA); None on the CPU
    ready: torch.cuda.Event | None = None
    # row i of `sampled` is the token of the request states[i] had at launch
    states: list[RequestState] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # req_id -> row

    @property
    def is_async(self) -> bool:
        return self.output is None


class AsyncOutputs:
    """The steps in flight, the last launched step (the placeholders' source) and the two pinned
    buffers their ids come back through. `states` is the runner's own dict (shared, not copied)."""

    def __init__(self, states: dict[str, RequestState], device: torch.device, max_num_seqs: int) -> None:
        self.states = states
        self.device = device
        self.last_launch: StepHandle | None = None
        self.unresolved: list[StepHandle] = []  # async steps whose ids are not on the host, in order
        # Two pinned buffers [max_num_seqs] int64, used in turn: one step in flight may copy into
        # one while the previous step's ids are read from the other.
        pin = device.type == "cuda"
        self._host_sampled = [torch.empty(max_num_seqs, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.num_async_steps = 0  # launched async with samples (statistics, tests)
        self.num_filled_steps = 0  # launched with placeholders filled on the device

    def placeholder_fill(self, host: HostInputs, is_async: bool) -> Callable[[torch.Tensor], object] | None:
        """A function that writes the placeholders' ids into a device input_ids tensor [T] from
        the previous step's sampled ids (still on the device), or None when there is none.

        A step that samples on the host appends its tokens at launch, so the tokens of the steps
        in flight must come first: they are resolved here, and the placeholders, known now, are
        written into the host inputs instead (as they are, rarely, when a placeholder's step is
        not the last one, whose ids alone stay readable on the device)."""
        previous = self.last_launch
        if not is_async or (host.placeholders and not _holds_placeholders(previous, host)):
            self.resolve_all()
            for flat, req_id, position in host.placeholders:
                host.token_ids[flat] = self.states[req_id].token_at(position)
            host.placeholders.clear()
        if not host.placeholders:
            return None
        assert previous is not None and previous.sampled is not None  # _holds_placeholders
        self.num_filled_steps += 1
        flats = [flat for flat, _, _ in host.placeholders]
        rows = [previous.rows[req_id] for _, req_id, _ in host.placeholders]
        sampled = previous.sampled
        if flats == rows == list(range(len(rows))):  # the usual decode batch: same order
            count = len(rows)
            return lambda input_ids: input_ids[:count].copy_(sampled[:count])
        flat_idx = list_to_device(flats, torch.long, self.device)
        row_idx = list_to_device(rows, torch.long, self.device)
        return lambda input_ids: input_ids.index_copy_(0, flat_idx, sampled.index_select(0, row_idx))

    def launch_async(self, host: HostInputs, hidden: torch.Tensor, decoded: DecodeResult | None,
                     compute_logits: Callable[[torch.Tensor], torch.Tensor],
                     sampled: torch.Tensor | None = None) -> StepHandle:  # fmt: skip
        """Async sampling: the ids stay on the device and their copy to the host is only
        enqueued. sampled: ids [S] int64 drawn on the device by the step's sampler; None: every
        row is plain greedy, so the argmax (the decode graph's own) is the token."""
        handle = StepHandle()
        if not host.sample_req_ids:
            handle.output = ModelRunnerOutput(sampled_token_ids={})
            return handle
        all_rows = len(host.sample_rows) == len(host.seq_lens) == host.query_start_loc[-1]
        if sampled is None:  # plain greedy: the argmax is the token
            if decoded is not None:
                sampled = decoded.greedy if all_rows else decoded.greedy[
                    list_to_device(host.sample_rows, torch.long, self.device)]
            else:
                rows = list_to_device(host.sample_rows, torch.long, self.device)
                sampled = compute_logits(hidden.index_select(0, rows)).argmax(dim=-1)
        handle.sampled = sampled
        for row, req_id in enumerate(host.sample_req_ids):
            state = self.states[req_id]
            state.num_pending += 1
            handle.states.append(state)
            handle.rows[req_id] = row
        self.num_async_steps += 1
        if self.device.type == "cuda":
            while len(self.unresolved) >= 2:  # both buffers hold ids not yet read
                self.resolve(self.unresolved[0])
            buffer = self._host_sampled[self.num_async_steps % 2]
            handle.host = buffer[: len(host.sample_req_ids)]
            handle.host.copy_(sampled, non_blocking=True)
            handle.ready = torch.cuda.Event()
            handle.ready.record()
        self.unresolved.append(handle)
        return handle

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        """The step's output, waiting for its sampled ids if they are still on their way (and
        for those of earlier steps, so that each state receives its tokens in order)."""
        while handle.output is None:
            self.resolve(self.unresolved[0])
        return handle.output

    def resolve_all(self) -> None:
        while self.unresolved:
            self.resolve(self.unresolved[0])

    def resolve(self, handle: StepHandle) -> None:
        """Bring an async step's ids to the host and append them to the states that are still
        the ones it sampled for (a request finished or preempted since has another or none)."""
        if handle.output is not None:
            return
        self.unresolved.remove(handle)
        if handle.ready is not None:
            assert handle.host is not None
            handle.ready.synchronize()
            tokens = handle.host.tolist()
        else:
            assert handle.sampled is not None
            tokens = handle.sampled.tolist()
        output = ModelRunnerOutput(sampled_token_ids={})
        for state, token in zip(handle.states, tokens):
            if self.states.get(state.req_id) is state:
                state.num_pending -= 1
                state.output_token_ids.append(token)
            output.sampled_token_ids[state.req_id] = token
        handle.output = output
        handle.sampled = None  # a graph's output buffer: rewritten by its next replay


def _holds_placeholders(step: StepHandle | None, host: HostInputs) -> bool:
    """Whether the step's sampled ids, still on the device, include every placeholder's."""
    if step is None or step.sampled is None:
        return False
    return all(req_id in step.rows for _, req_id, _ in host.placeholders)
