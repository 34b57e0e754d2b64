"""The choices of /v1/completions: a choice's text and legacy-format logprobs for one output,
with the echoed prompt in front (echo) and the scoring case (the prompt alone)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pagedserve.entrypoints.openai.protocol import CompletionRequest, clamp_logprob
from pagedserve.entrypoints.openai.responses import CompletionLogProbs
from pagedserve.outputs import CompletionOutput, Logprob, PromptLogprobs


def completion_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob] | None], num_top: int,
    text_offset: int, decode: Any,
) -> CompletionLogProbs:  # fmt: skip
    """The legacy completions format: parallel lists, the chosen token's text in `tokens`."""
    out = CompletionLogProbs()
    for token_id, entry in zip(token_ids, logprobs):
        chosen = entry.get(token_id) if entry is not None else None
        token = (
            chosen.decoded_token
            if chosen is not None and chosen.decoded_token is not None
            else decode(token_id)
        )
        out.tokens.append(token)
        out.text_offset.append(text_offset)
        text_offset += len(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(clamp_logprob(chosen.logprob) if chosen is not None else None)
        top = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[: max(num_top, 1)] if num_top else []
        by_text: dict[str, float] = {}
        for t, lp in top:  # keyed by text: of two tokens that read the same, the likelier one stays
            by_text.setdefault(lp.decoded_token if lp.decoded_token is not None else decode(t),
                               clamp_logprob(lp.logprob))
        out.top_logprobs.append(by_text)
    return out


@dataclass(slots=True)
class Echo:
    """A prompt to put in front of a choice's text (echo): its text, ids and logprobs."""

    text: str
    token_ids: list[int]
    logprobs: PromptLogprobs | None  # None: not asked for (or not yet known)


@dataclass(slots=True)
class ChoicePart:
    text: str
    logprobs: CompletionLogProbs | None
    finish_reason: str | None
    stop_reason: int | str | None
    generated_text: str  # what the model generated (the audit's output)
    generated_ids: list[int]  # its token ids (none for a scoring request: its one sample is dropped)

    @property
    def num_generated(self) -> int:  # completion tokens
        return len(self.generated_ids)


def choice_part(
    request: CompletionRequest, out: CompletionOutput, echo: Echo | None, text_offset: int, decode: Any
) -> ChoicePart:
    """A choice's text and legacy logprobs for one output: the echoed prompt (if any) first, then
    what was generated. A scoring request (echo, max_tokens 0) answers with the prompt alone and
    finish_reason "length": the one token the engine sampled for it is dropped."""
    scoring = request.is_scoring
    ids: list[int] = []
    lps: list[dict[int, Logprob] | None] = []
    text = ""
    if echo is not None:
        text = echo.text
        ids += echo.token_ids
        lps += list(echo.logprobs) if echo.logprobs is not None else [None] * len(echo.token_ids)
    if not scoring:
        text += out.text
        ids += out.token_ids
        lps += list(out.logprobs or [])
    logprobs = None
    if request.logprobs is not None:
        logprobs = completion_logprobs(ids, lps, request.logprobs, text_offset, decode)
    if scoring:
        return ChoicePart(text, logprobs, "length", None, "", [])
    return ChoicePart(text, logprobs, out.finish_reason, out.stop_reason, out.text, list(out.token_ids))


def single_decoder(decode: Any) -> Any:
    cache: dict[int, str] = {}

    def one(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = decode([token_id])
        return cache[token_id]

    return one
