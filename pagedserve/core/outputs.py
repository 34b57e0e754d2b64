"""Messages that cross between the scheduler (core) and the model side (worker).

Pure Python: plain ints, lists and strings only, so that the plan can be sent over IPC and the
scheduler tests need no torch.

One step:  scheduler.schedule() -> SchedulerOutput -> model runner -> ModelRunnerOutput
           -> scheduler.update_from_output() -> list[EngineCoreOutput] -> output processor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """Everything the worker needs about a request it does not know yet.

    Sent the first time a request is scheduled, and again after it was preempted (recompute or
    swap) or forked from a parent (n > 1): the worker forgets a request when it leaves the running
    set, so a resumed request arrives whole, with all its tokens and its full block table.
    """

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens already generated (non-empty only when resumed)
    sampling_params: SamplingParams
    block_ids: list[int]  # the full block table, logical block i -> physical block block_ids[i]
    num_computed_tokens: int  # tokens whose K/V are already in the cache (prefix hit, swap, fork)
    eos_token_id: int | None


@dataclass(slots=True)
class CachedRequestData:
    """The diff for a request the worker already holds: appended blocks and the computed count."""

    req_id: str
    new_block_ids: list[int]  # appended to the end of the worker's block table
    num_computed_tokens: int


@dataclass(slots=True)
class GrammarOutput:
    """The structured-output token masks of one step (vLLM's GrammarOutput), filled by the engine
    core after scheduling: it holds the grammars and the tokenizer, so the worker needs neither and
    only applies the masks to the logits.

    Row i of the bitmask constrains the token that request `req_ids[i]` samples this step: the
    rows are [len(req_ids), num_words] int32, num_words = ceil(vocab / 32), bit j of a row set =
    token j allowed (xgrammar's layout), sent as their raw bytes (native byte order, row-major) so
    that the plan stays plain data for IPC. Only requests that sample this step with a grammar not
    yet terminated have a row; every other row of the logits is left as it is.
    """

    req_ids: list[str]
    bitmask: bytes  # len(req_ids) * num_words * 4 bytes
    num_words: int


@dataclass(slots=True)
class SchedulerOutput:
    """The one plan handed to the model side for one step.

    Worker order of operations: forget `finished_req_ids`; swap out; swap in; copy blocks; run the
    forward pass over `num_scheduled_tokens` tokens per request; sample where a request catches up
    with all its tokens (num_computed_tokens + scheduled == prompt + output + pending tokens,
    pending ones being those sampled by a step whose results the worker has not reported yet),
    masking the logits of the structured-output requests listed in `grammar` first.

    The worker's num_computed_tokens of a request is the one this plan carries (each scheduled
    request is in `scheduled_new_reqs` or `scheduled_cached_reqs`): the plan is its one writer.

    Under async scheduling the plan for step n+1 is made before step n's tokens are known: a
    request may then compute the position of its token from step n, whose id the worker takes
    from step n's sampled tokens on the device.
    """

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to run this step (> 0)
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # finished, aborted or preempted since the last step: forget them
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu, cpu)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, gpu)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src gpu, dst gpu)
    step_id: int = 0  # counts the scheduler's plans; pairs an update with its plan
    # set by the engine core after schedule() when structured-output requests sample this step
    grammar: GrammarOutput | None = None

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class LogprobsLists:
    """Log-probabilities for a run of positions, as plain lists.

    Row i is one position: token_ids[i][0] is the chosen token (sampled, or the prompt token),
    token_ids[i][1:] the top-k tokens by log-probability; logprobs[i] lines up with token_ids[i];
    ranks[i] is the rank of the chosen token in the full distribution (1 = most likely).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]

    def __len__(self) -> int:
        return len(self.ranks)

    def extend(self, other: LogprobsLists) -> None:
        self.token_ids.extend(other.token_ids)
        self.logprobs.extend(other.logprobs)
        self.ranks.extend(other.ranks)


@dataclass(slots=True)
class ModelRunnerOutput:
    """What the model side produced in one step, keyed by request id."""

    sampled_token_ids: dict[str, int]  # only requests that sampled this step
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)  # one row per sampled token
    # prompt logprobs for the prompt positions this step covered; row j predicts the next prompt
    # token; the request's first prompt token has no row (its logprob is None)
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or (set by the output processor) a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # aborted by the user, or by the server on disconnect

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class EngineCoreOutput:
    """Per request and step: the new tokens and, once, why it finished."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id that ended it, if any
    new_logprobs: LogprobsLists | None = None
    new_prompt_logprobs: LogprobsLists | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    first_scheduled_time: float | None = None  # time.monotonic() when the request first ran

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
