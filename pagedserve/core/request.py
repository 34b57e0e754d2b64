"""The scheduler's view of one sequence being generated.

A user request with n > 1 samples becomes n core requests: a leader that computes the shared
prompt, and n - 1 followers that wait until the leader has computed all prompt tokens but the last
and then fork from it, sharing its full prompt blocks (see core/fork.py).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.core.outputs import FinishReason

if TYPE_CHECKING:
    from pagedserve.core.block_hash import BlockHash
    from pagedserve.sampling_params import SamplingParams


def token_slice(prompt: list[int], output: list[int], start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output, without building the concatenation."""
    prompt_len = len(prompt)
    if end <= prompt_len:
        return prompt[start:end]
    if start >= prompt_len:
        return output[start - prompt_len : end - prompt_len]
    return prompt[start:] + output[: end - prompt_len]


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # in the waiting queue, holds no blocks
    WAITING_FOR_FORK = enum.auto()  # a follower: held by its leader, holds no blocks
    RUNNING = enum.auto()  # holds GPU blocks
    SWAPPED = enum.auto()  # holds CPU blocks only
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first under the priority policy (vLLM's convention)
    # vLLM's cache_salt: enters the hash of the first block, so that only requests with the same
    # salt share prefix-cache blocks (the server sets one per tenant: ops/tenants.py)
    cache_salt: str | None = None
    priority_class: str = "interactive"  # or "batch": waits behind interactive work, evicted first

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache or being written by a scheduled step: the scheduler
    # advances it when it plans a step, not when the step's results come back.
    # Invariant: num_computed_tokens < num_tokens + num_pending when num_pending > 0 (then it is
    # num_tokens + num_pending - 1: the newest pending token is not computed, its id is unknown),
    # and num_computed_tokens <= num_tokens otherwise.
    num_computed_tokens: int = 0
    # Tokens sampled by scheduled steps whose results have not come back yet: 0 in synchronous
    # use between steps; up to 2 under async scheduling (the step in flight and the one just
    # planned). A step that computes up to num_tokens + num_pending samples one more.
    num_pending: int = 0
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first schedule
    first_scheduled_time: float | None = None  # time.monotonic() when first scheduled
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Chained hashes of this request's full blocks, in order, extended as blocks fill.
    block_hashes: list[BlockHash] = field(default_factory=list)
    # n > 1: the leader lists the followers that will fork from it; a follower names its leader.
    followers: list[Request] = field(default_factory=list)
    leader: Request | None = None
    # Set on the step it is (re)scheduled after holding no worker state: the worker needs it whole.
    needs_full_data: bool = True
    worker_num_blocks: int = 0  # length of the block table the worker holds
    num_prompt_logprob_rows: int = 0  # prompt logprob rows reported so far

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prefill_left(self) -> int:
        """Known tokens still to compute before the next one is sampled: the rest of the prompt
        (after a recompute preemption, of the prompt and the outputs); 0 while decoding."""
        return max(0, self.num_tokens - self.num_computed_tokens - 1)

    @property
    def is_decoding(self) -> bool:
        """Its prompt is computed (planned, under async scheduling): a step gives it one token."""
        return self.num_computed_tokens >= self.num_prompt_tokens

    def token_ids_range(self, start: int, end: int) -> list[int]:
        return token_slice(self.prompt_token_ids, self.output_token_ids, start, end)

    @property
    def max_computable_tokens(self) -> int:
        """How far the scheduler may compute: every known token and the pending one, whose id
        the worker takes from the step that samples it (async scheduling); a leader stops one
        short of the prompt end until its followers have forked, so that each sample computes
        the last prompt token itself."""
        if self.followers:
            return self.num_prompt_tokens - 1
        return self.num_tokens + self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
