"""EngineCoreOutput (per child request and step) -> RequestOutput (per user request).

Per child: incremental detokenization, stop strings, logprob dicts. Per parent (a user request
with n children): aggregation and the streaming mode (`SamplingParams.output_kind`):

    CUMULATIVE  every output carries all n completions with everything generated so far
    DELTA       every output carries only the completions that changed, each with only what is new
                (text, token_ids, logprobs); prompt_logprobs travel once, with the first output
    FINAL_ONLY  one output per request, once all n children finished

While a request runs, the last `max(len(stop)) - 1` characters of its text are held back (a stop
string may still be forming across deltas); they are released when it finishes.

vLLM behaviours mirrored here: a token that stopped the request (EOS or a stop_token_id) stays in
token_ids but is not detokenized into the text unless include_stop_str_in_output; a stop string
truncates the text before it (after it with include_stop_str_in_output), sets finish_reason
"stop" and stop_reason to the string, and the child goes to `reqs_to_abort`; the generated token
ids are never truncated. Stop strings are not searched in text of the first min_tokens tokens.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from pagedserve.core.outputs import EngineCoreOutput, FinishReason, LogprobsLists
from pagedserve.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
)
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Token ids -> text, one token at a time; the concatenated pieces plus `flush()` at the end
    equal `tokenizer.decode(ids, skip_special_tokens=...)`.

    Fast tokenizers go through `tokenizers.decoders.DecodeStream` (O(1) per token). It returns
    nothing while the text ends in an incomplete UTF-8 sequence; `flush()` renders such a tail the
    way `decode` does (replacement characters). Tokenizers without a Rust backend fall back to
    re-decoding the whole sequence per token (O(n) per token, correct, slow).
    """

    __slots__ = ("_tokenizer", "_stream", "_skip", "_ids", "_emitted", "_pending")

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        backend: Tokenizer | None = getattr(tokenizer, "backend_tokenizer", None)
        self._stream: tuple[DecodeStream, Tokenizer] | None = None
        if isinstance(backend, Tokenizer):
            self._stream = (DecodeStream(skip_special_tokens=skip_special_tokens), backend)
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._emitted = 0  # characters returned so far
        self._pending = False  # the last token(s) produced no text yet

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        piece: str
        if self._stream is not None:
            stream, backend = self._stream
            maybe = stream.step(backend, token_id)
            self._pending = maybe is None
            piece = maybe or ""
        else:
            full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
            self._pending = full.endswith("\ufffd")
            piece = "" if self._pending else full[self._emitted :]
        self._emitted += len(piece)
        return piece

    def flush(self) -> str:
        """The text still held back at the end of the sequence ("" almost always)."""
        if not self._pending:
            return ""
        self._pending = False
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        piece = full[self._emitted :]
        self._emitted += len(piece)
        return piece


def find_stop_string(text: str, new_from: int, stops: list[str], include: bool) -> tuple[str, int] | None:
    """The earliest stop string that ends in text[new_from:] (it may start before new_from, having
    straddled deltas) -> (the string, the length to truncate the text to), or None."""
    best: tuple[str, int] | None = None
    for s in stops:
        idx = text.find(s, max(0, new_from - len(s) + 1))
        if idx != -1 and (best is None or idx < best[1]):
            best = (s, idx)
    if best is None:
        return None
    s, idx = best
    return s, idx + len(s) if include else idx


@dataclass(slots=True)
class _Child:
    req_id: str
    index: int
    parent: _Parent
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    has_news: bool = False  # changed since its last output
    sent_text: int = 0  # DELTA: characters / tokens already carried by earlier outputs
    sent_tokens: int = 0


@dataclass(slots=True)
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    children: list[_Child] = field(default_factory=list)
    num_unfinished: int = 0
    prompt_logprobs: PromptLogprobs | None = None
    prompt_logprobs_from: str | None = None  # the one child whose prompt logprobs are kept
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0


@dataclass(slots=True)
class ProcessedOutputs:
    request_outputs: list[RequestOutput]  # one per parent request with news, per output_kind
    reqs_to_abort: list[str]  # child ids that a stop string finished: the core must abort them


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.tokenizer = tokenizer  # None: no detokenization (text stays "")
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, _Child] = {}  # unfinished children only
        self._token_text: dict[int, str] = {}  # token id -> its text alone (logprob decoded_token)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        child_ids: list[str],
        arrival_time: float,
    ) -> None:
        if len(child_ids) != params.n:
            raise ValueError(f"child_ids must have n={params.n} entries, got {len(child_ids)}.")
        if request_id in self._parents or any(c in self._children for c in child_ids):
            raise ValueError(f"request_id {request_id!r} (or one of its child ids) is already running.")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine runs without one.")
        parent = _Parent(request_id, prompt, prompt_token_ids, params, RequestMetrics(arrival_time))
        parent.num_unfinished = len(child_ids)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]  # nothing predicts the first prompt token
        decode = self.tokenizer is not None and params.detokenize
        for index, child_id in enumerate(child_ids):
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) if decode else None
            child = _Child(child_id, index, parent, detok)
            if params.logprobs is not None:
                child.logprobs, child.cumulative_logprob = [], 0.0
            parent.children.append(child)
            self._children[child_id] = child
        self._parents[request_id] = parent

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        now = time.monotonic()
        touched: dict[str, _Parent] = {}
        reqs_to_abort: list[str] = []
        for out in outputs:
            child = self._children.get(out.req_id)
            if child is None:  # aborted, or finished by a stop string while the core ran on
                continue
            parent = child.parent
            parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
            if parent.metrics.first_scheduled_time is None:
                parent.metrics.first_scheduled_time = out.first_scheduled_time
            if out.new_prompt_logprobs is not None and parent.prompt_logprobs is not None:
                if parent.prompt_logprobs_from in (None, child.req_id):
                    parent.prompt_logprobs_from = child.req_id
                    parent.prompt_logprobs.extend(self._logprob_dicts(out.new_prompt_logprobs, parent.params))
            if not out.new_token_ids and not out.finished:
                continue
            if out.new_token_ids:
                if parent.metrics.first_token_time is None:
                    parent.metrics.first_token_time = now
                parent.metrics.last_token_time = now
            stop_string = self._update_child(child, out)
            finish_reason = str(out.finish_reason) if out.finish_reason is not None else None
            stop_reason = out.stop_reason
            if stop_string is not None:
                finish_reason, stop_reason = str(FinishReason.STOP), stop_string
                if not out.finished:
                    reqs_to_abort.append(child.req_id)
            if finish_reason is not None:
                child.finish_reason, child.stop_reason = finish_reason, stop_reason
                parent.num_unfinished -= 1
                del self._children[child.req_id]
            child.has_news = True
            touched[parent.request_id] = parent

        request_outputs: list[RequestOutput] = []
        for parent in touched.values():
            if parent.num_unfinished == 0:
                parent.metrics.finished_time = now
                del self._parents[parent.request_id]
            ro = self._make_output(parent)
            if ro is not None:
                request_outputs.append(ro)
        return ProcessedOutputs(request_outputs, reqs_to_abort)

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Forget these parent requests; returns their unfinished child ids, to abort in the core."""
        child_ids: list[str] = []
        for request_id in request_ids:
            parent = self._parents.pop(request_id, None)
            if parent is None:
                continue
            for child in parent.children:
                if self._children.pop(child.req_id, None) is not None:
                    child_ids.append(child.req_id)
        return child_ids

    def has_request(self, request_id: str) -> bool:
        """Whether a parent request with this id is running."""
        return request_id in self._parents

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ------------------------------------------------------------------ per child

    def _update_child(self, child: _Child, out: EngineCoreOutput) -> str | None:
        """Appends the step's tokens, logprobs and text. Returns the stop string that ended it."""
        params = child.parent.params
        new_ids = out.new_token_ids
        num_before = len(child.token_ids)
        child.token_ids.extend(new_ids)
        if out.new_logprobs is not None and child.logprobs is not None:
            rows = out.new_logprobs
            child.logprobs.extend(self._logprob_dicts(rows, params))
            child.cumulative_logprob = (child.cumulative_logprob or 0.0) + sum(lp[0] for lp in rows.logprobs)
        detok = child.detokenizer
        if detok is None:
            return None
        to_decode = new_ids
        if out.finish_reason == FinishReason.STOP and new_ids and not params.include_stop_str_in_output:
            to_decode = new_ids[:-1]  # the stop token's text is not part of the output
        text = child.text
        check_from = len(text)
        for j, token_id in enumerate(to_decode):
            text += detok.step(token_id)
            if num_before + j + 1 <= params.min_tokens:
                check_from = len(text)  # stop strings count only after min_tokens tokens
        if out.finished:
            text += detok.flush()
        stop_string = None
        if params.stop and len(child.token_ids) > params.min_tokens and len(text) > check_from:
            hit = find_stop_string(text, check_from, params.stop_strings, params.include_stop_str_in_output)
            if hit is not None:
                stop_string, cut = hit
                text = text[:cut]
        child.text = text
        return stop_string

    def _logprob_dicts(self, rows: LogprobsLists, params: SamplingParams) -> list[dict[int, Logprob]]:
        """Row [chosen] + top-k -> {id: Logprob}; the chosen token first with its own rank, then
        the top-k with ranks 1..k (a top-k entry equal to the chosen token is not repeated)."""
        decode = self.tokenizer is not None and params.detokenize
        dicts: list[dict[int, Logprob]] = []
        for ids, lps, rank in zip(rows.token_ids, rows.logprobs, rows.ranks):
            d = {ids[0]: Logprob(lps[0], rank, self._decode_one(ids[0]) if decode else None)}
            for top_rank, (token_id, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
                if token_id not in d:
                    d[token_id] = Logprob(lp, top_rank, self._decode_one(token_id) if decode else None)
            dicts.append(d)
        return dicts

    def _decode_one(self, token_id: int) -> str:
        # As vLLM: the token decoded alone, special tokens kept.
        cached = self._token_text.get(token_id)
        if cached is not None:
            return cached
        assert self.tokenizer is not None
        decoded = self.tokenizer.decode([token_id])
        text = decoded if isinstance(decoded, str) else ""
        self._token_text[token_id] = text
        return text

    # ------------------------------------------------------------------ per parent

    def _make_output(self, parent: _Parent) -> RequestOutput | None:
        kind = parent.params.output_kind
        finished = parent.num_unfinished == 0
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        children = [c for c in parent.children if c.has_news] if delta else parent.children
        completions = [self._completion(c, parent.params, delta) for c in children]
        for c in parent.children:
            c.has_news = False
        prompt_logprobs = parent.prompt_logprobs
        if delta:
            prompt_logprobs = None if parent.prompt_logprobs_sent else prompt_logprobs
            parent.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=completions,
            finished=finished,
            metrics=dataclasses.replace(parent.metrics),
            num_cached_tokens=parent.num_cached_tokens,
        )

    @staticmethod
    def _completion(child: _Child, params: SamplingParams, delta: bool) -> CompletionOutput:
        finished = child.finish_reason is not None
        visible = len(child.text) if finished else max(0, len(child.text) - params.output_text_buffer_length)
        logprobs = child.logprobs
        if delta:
            text = child.text[child.sent_text : visible] if visible > child.sent_text else ""
            child.sent_text = max(child.sent_text, visible)
            token_ids = child.token_ids[child.sent_tokens :]
            if logprobs is not None:
                logprobs = logprobs[child.sent_tokens :]
            child.sent_tokens = len(child.token_ids)
        else:
            text = child.text[:visible]
            token_ids = list(child.token_ids)
            if logprobs is not None:
                logprobs = list(logprobs)
        return CompletionOutput(
            index=child.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=child.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=child.finish_reason,
            stop_reason=child.stop_reason,
        )
