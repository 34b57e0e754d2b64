"""User-facing outputs, field for field as vLLM: RequestOutput, CompletionOutput, Logprob.

Pure Python. The output processor (`engine/output_processor.py`) builds these from the engine
core's per-step `EngineCoreOutput`s.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Logprob:
    """The log-probability of one token at one position.

    rank: 1-based rank of the token in the full distribution (1 = most likely); decoded_token:
    the token's text alone (None when no tokenizer is available).
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token first, then the top-k).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token; the first is None (nothing predicts the first token).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps of one request's life, for latency metrics, in time.monotonic() seconds (the
    engine passes a monotonic arrival_time; the output processor stamps the rest)."""

    arrival_time: float
    first_scheduled_time: float | None = None  # when the engine first ran it (queue time ends)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return max(0.0, self.first_scheduled_time - self.arrival_time)

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass(slots=True)
class CompletionOutput:
    """One of the n completions of a request.

    In DELTA streaming mode `text`, `token_ids` and `logprobs` hold only what is new since the
    previous output of this completion; otherwise they hold everything so far.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string; None for EOS/length

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, "
            f"token_ids={self.token_ids}, cumulative_logprob={self.cumulative_logprob}, "
            f"logprobs={_short_logprobs(self.logprobs)}, finish_reason={self.finish_reason}, "
            f"stop_reason={self.stop_reason!r})"
        )


@dataclass(slots=True)
class RequestOutput:
    """What a request has produced so far (or, in DELTA mode, since its previous output)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, "
            f"prompt_logprobs={_short_logprobs(self.prompt_logprobs)}, outputs={self.outputs}, "
            f"finished={self.finished}, metrics={self.metrics}, "
            f"num_cached_tokens={self.num_cached_tokens})"
        )


def _short_logprobs(logprobs: list | None) -> str:
    # Logprob lists are long; the repr shows only their length.
    return "None" if logprobs is None else f"<{len(logprobs)} positions>"


def merge_delta_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two DELTA outputs of one request, `first` then `later`, as one: each completion's text,
    token ids and logprobs concatenated, the rest (finish, cumulative logprob, metrics) from the
    later one. A consumer that fell behind takes what queued up as one output (one SSE event
    instead of several), so a loaded front end spends its time per event, not per token."""
    earlier = {c.index: c for c in first.outputs}
    outputs = []
    for c in later.outputs:
        old = earlier.pop(c.index, None)
        if old is None:
            outputs.append(c)
            continue
        logprobs = None if old.logprobs is None and c.logprobs is None else [*(old.logprobs or []), *(c.logprobs or [])]
        outputs.append(CompletionOutput(c.index, old.text + c.text, old.token_ids + c.token_ids, c.cumulative_logprob,
                                        logprobs, c.finish_reason, c.stop_reason))  # fmt: skip
    outputs.extend(earlier.values())
    outputs.sort(key=lambda c: c.index)
    return RequestOutput(
        request_id=later.request_id, prompt=later.prompt, prompt_token_ids=later.prompt_token_ids,
        prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else later.prompt_logprobs,
        outputs=outputs, finished=later.finished, metrics=later.metrics, num_cached_tokens=later.num_cached_tokens,
    )  # fmt: skip
