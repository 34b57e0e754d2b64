"""/v1/completions, and `OpenAIServing`: what both generation routes share (model check, engine
state, load shedding, sampling params, disconnect handling, audit).

One HTTP request with k prompts and n samples runs k engine requests "<id>-<i>" (each with n
children); choice index = i * n + sample index, as vLLM numbers them.

Scoring (the legacy OpenAI call: echo=true, max_tokens=0, logprobs=N): each choice is the prompt
itself with the prompt's token logprobs (the first token's null: nothing predicts it),
finish_reason "length" and no completion tokens. The engine computes them as prompt_logprobs while
it samples one token that is dropped (CompletionRequest.to_sampling_params).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedserve.engine.async_llm import AsyncLLM, RequestHandle
from pagedserve.engine.messages import EngineDeadError
from pagedserve.engine.request_builder import InvalidInputError, PreparedPrompt
from pagedserve.entrypoints.openai.errors import (
    BadRequestError,
    NotFoundError,
    OpenAIError,
    ServerShutdownError,
    ServiceUnavailableError,
    error_sse,
    overloaded,
)
from pagedserve.entrypoints.openai.prompt_bounds import PromptBounds, tokenize_prompt
from pagedserve.entrypoints.openai.protocol import (
    CompletionRequest,
    _SamplingRequest,
    clamp_logprob,
    random_id,
)
from pagedserve.entrypoints.openai.responses import (
    SSE_DONE,
    CompletionLogProbs,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    PromptLogprob,
    PromptTokenUsageInfo,
    UsageInfo,
    sse_event,
)
from pagedserve.entrypoints.openai.slo_admission import priority_class_of
from pagedserve.entrypoints.openai.structured_limits import StructuredOutputLimits, compile_request_grammar
from pagedserve.entrypoints.openai.tenancy import TenantGate, tenancy_of
from pagedserve.entrypoints.openai.vllm_compat import log_request
from pagedserve.inputs import PromptType
from pagedserve.ops.audit import AuditLog
from pagedserve.ops.audit_middleware import claim_audit, write_line
from pagedserve.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

T = TypeVar("T")
# nginx's "client closed request": what a non-streamed request whose client went away is logged
# and counted as (not a 5xx; nothing is sent, the client is gone).
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The client of a non-streamed request disconnected before its response was ready."""


@dataclass
class ServerState:
    """What the routes read; `engine` is None until the engine is ready."""

    served_model_names: list[str]
    max_model_len: int
    engine: AsyncLLM | None = None
    start_error: str | None = None
    chat_template: str | None = None
    max_waiting_requests: int | None = None
    audit: AuditLog | None = None
    # the model's generation_config defaults for knobs a request leaves unset (as vLLM)
    default_sampling_params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # "draining" (graceful shutdown) or "restarting" (a dead engine being replaced): /health and
    # new requests answer 503 while set (entrypoints/openai/lifecycle.py sets it)
    lifecycle_status: str | None = None
    bounds: PromptBounds = field(default_factory=PromptBounds)  # prompt count/size, template rules


@dataclass(slots=True)
class AuditInfo:
    request_id: str
    arrival_wall: float
    input: str | list[int] | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_parts: list[str] = field(default_factory=list)
    status: str = "error"  # "ok", "error", "aborted" (client gone), "shutdown" (cut at shutdown)
    http_status: int | None = 200  # the response's status; None when none was sent


class OpenAIServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def model_name(self) -> str:
        return self.state.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.state.served_model_names:
            raise NotFoundError(f"The model `{model}` does not exist.", param="model")

    def engine(self) -> AsyncLLM:
        if self.state.lifecycle_status == "draining":
            raise ServiceUnavailableError("The server is shutting down; send the request to another replica.")
        if self.state.lifecycle_status == "restarting":
            raise ServiceUnavailableError("The engine is restarting; retry shortly.", retry_after_s=5)
        engine = self.state.engine
        if engine is None:
            msg = self.state.start_error or "The engine is starting; retry shortly."
            raise ServiceUnavailableError(msg, retry_after_s=None if self.state.start_error else 5)
        if not engine.is_alive:
            raise ServiceUnavailableError("The engine is not running.")
        return engine

    def check_load(self, engine: AsyncLLM, num_new: int, priority_class: str = "interactive") -> None:
        """Load shedding: 429 once the waiting queue would pass --max-waiting-requests, or the
        predicted queueing delay the TTFT objective (slo_admission.py)."""
        limit = self.state.max_waiting_requests
        if limit is not None:
            waiting = engine.num_waiting_estimate
            if waiting + num_new > limit:
                raise overloaded(
                    f"Too many requests waiting ({waiting}, limit {limit}); retry later.", retry_after_s=1
                )
        admission = self.state.extra.get("slo")
        if admission is not None:
            admission.check(num_new, priority_class)

    def sampling_params(self, request: _SamplingRequest, prompt_len: int, stream: bool) -> SamplingParams:
        """The request's SamplingParams for a prompt of `prompt_len` tokens that passed
        AsyncLLM.prepare_prompt (which owns the prompt-length rule): the completion budget, then
        construction; the model's bounds are checked once, by `prepare_params`."""
        max_len = self.state.max_model_len
        requested = request.requested_max_tokens()
        if requested is not None and prompt_len + requested > max_len:
            raise BadRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
            )  # fmt: skip
        kwargs = request.to_sampling_params(max_len - prompt_len, self.state.default_sampling_params)
        kwargs["output_kind"] = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            raise BadRequestError(str(e)) from None

    @staticmethod
    def prepare_prompt(engine: AsyncLLM, request: _SamplingRequest, prompt: PromptType) -> PreparedPrompt:
        """The engine boundary's one prompt check (truncation included), as a 400 naming the field."""
        try:
            return engine.prepare_prompt(prompt, request.truncate_prompt_tokens)
        except InvalidInputError as e:
            raise BadRequestError(str(e), param=request.param_for(e.param)) from None
        except ValueError as e:  # cache_salt
            raise BadRequestError(str(e), param=request.param_for("prompt")) from None

    @staticmethod
    def prepare_params(engine: AsyncLLM, request: _SamplingRequest, params: SamplingParams) -> None:
        """The engine boundary's one check of the params against the model, as a 400."""
        try:
            engine.prepare_params(params)
        except InvalidInputError as e:
            raise BadRequestError(str(e), param=request.param_for(e.param)) from None

    async def compile_grammar(self, engine: AsyncLLM, request: _SamplingRequest, params: SamplingParams) -> str | None:
        """The serialized grammar of the request's structured-output spec (None without one):
        limits, then one compile off the event loop; a 400 naming the field on failure."""
        limits = self.state.extra.get("structured_output_limits") or StructuredOutputLimits()
        return await compile_request_grammar(engine, params.structured_outputs, limits,
                                             request.structured_outputs_param())

    def tenant_gate(self, raw: Request, request: _SamplingRequest, path: str) -> TenantGate:
        """The request's tenant policy at work (entrypoints/openai/tenancy.py)."""
        return tenancy_of(self.state.extra, self.state.served_model_names).gate(raw, request, path)

    def request_id(self, raw: Request, prefix: str) -> str:
        rid = getattr(raw.state, "request_id", None)
        return f"{prefix}-{rid}" if rid else random_id(prefix)

    def tenant(self, raw: Request) -> str | None:
        return getattr(getattr(raw.state, "principal", None), "tenant", None)

    def audit(self, raw: Request, info: AuditInfo) -> None:
        """The one detailed audit line of a served request; a second call for the same request
        (or one after the audit middleware wrote its line) writes nothing. A request cut without
        an outcome of its own ("aborted") is audited as the log's cut_status, which is
        "shutdown" once shutdown began (AuditLog.begin_shutdown())."""
        log = self.state.audit
        if log is None or not claim_audit(raw.scope.setdefault("state", {})):
            return
        status = log.cut_status if info.status == "aborted" else info.status
        principal = getattr(raw.state, "principal", None)
        write_line(
            log, request_id=info.request_id, tenant=self.tenant(raw), model=self.model_name,
            arrival_time=info.arrival_wall, finish_time=time.time(), prompt_tokens=info.prompt_tokens,
            completion_tokens=info.completion_tokens, status=status, input=info.input,
            output="".join(info.output_parts), client_request_id=getattr(raw.state, "client_request_id", None),
            key_id=getattr(principal, "key_id", None), method=raw.method, path=raw.url.path,
            http_status=None if status in ("aborted", "shutdown") else info.http_status,
        )  # fmt: skip

    @staticmethod
    async def until_disconnect(raw: Request, work: Awaitable[T]) -> T:
        """Runs `work`; cancels it (so its engine requests abort) if the client goes away."""
        task = asyncio.ensure_future(work)

        async def watch() -> None:
            while True:
                message = await raw.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()  # its generators close, which aborts the engine requests (KV freed)
            raise ClientDisconnected("client disconnected")
        return task.result()


async def run_to_end(
    serving: OpenAIServing, raw: Request, work: Awaitable[T], info: AuditInfo,
    handles: Sequence[RequestHandle], engine: AsyncLLM,
) -> T | Response:
    """Awaits a non-streamed request's outputs. A client that disconnects has its requests
    aborted (audited as such) and gets a 499 that nobody reads: logged and counted as a client
    disconnect, not a server error; an engine failure becomes its OpenAI error response; the
    handles are released on every path."""
    try:
        return await serving.until_disconnect(raw, work)
    except ClientDisconnected:
        info.status = "aborted"
        serving.audit(raw, info)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except asyncio.CancelledError:
        info.status = "aborted"
        serving.audit(raw, info)
        raise
    except Exception as e:  # noqa: BLE001 - every engine failure becomes an OpenAI error
        err = engine_error(e)
        info.http_status = err.status
        info.status = failure_status(e)
        serving.audit(raw, info)
        return err.to_response()
    finally:
        for handle in handles:
            engine.release(handle)


def failure_status(e: Exception) -> str:
    """The audit status of a request that ended with `e`."""
    return "shutdown" if isinstance(e, ServerShutdownError) else "error"


def engine_error(e: Exception) -> OpenAIError:
    if isinstance(e, EngineDeadError):
        return ServiceUnavailableError(f"The engine failed while serving the request: {e}")
    if isinstance(e, OpenAIError):
        return e
    return BadRequestError(str(e))


async def merge_generators(gens: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive; closing this one cancels them all."""
    queue: asyncio.Queue[tuple[int, T] | tuple[int, BaseException] | None] = asyncio.Queue()

    async def drain(i: int, gen: AsyncIterator[T]) -> None:
        try:
            async for item in gen:
                queue.put_nowait((i, item))
        except Exception as e:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait((i, e))
        queue.put_nowait(None)

    tasks = [asyncio.create_task(drain(i, g)) for i, g in enumerate(gens)]
    remaining = len(tasks)
    try:
        while remaining:
            entry = await queue.get()
            if entry is None:
                remaining -= 1
                continue
            i, item = entry
            if isinstance(item, BaseException):
                raise item
            yield i, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def prompt_logprobs_json(plp: PromptLogprobs | None) -> list[dict[int, PromptLogprob] | None] | None:
    if plp is None:
        return None
    return [
        None if d is None else {
            t: PromptLogprob(logprob=clamp_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
            for t, lp in d.items()
        }
        for d in plp
    ]  # fmt: skip


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


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw: Request) -> Response:
        self.check_model(request.model)
        engine = self.engine()
        gate = self.tenant_gate(raw, request, "/v1/completions")
        prompts = gate.redact_prompts(request.prompts())  # before tokenization
        self.state.bounds.check_num_prompts(len(prompts), request.n)
        priority_class = priority_class_of(raw, request.priority_class)
        self.check_load(engine, len(prompts), priority_class)
        prepared: list[PreparedPrompt] = []
        for p in prompts:
            text, ids = await tokenize_prompt(engine, self.state.bounds, p)
            prompt = gate.salted({"prompt_token_ids": ids, **({"prompt": text} if text else {})})
            prepared.append(self.prepare_prompt(engine, request, prompt))
        tokenized = [(pp.text, pp.token_ids) for pp in prepared]
        params = [self.sampling_params(request, len(pp.token_ids), request.is_streaming) for pp in prepared]
        for sp in params:
            gate.cap(sp)
            self.prepare_params(engine, request, sp)
        grammar = await self.compile_grammar(engine, request, params[0])  # the same spec for every prompt
        base_id = self.request_id(raw, "cmpl")
        info = AuditInfo(
            base_id, time.time(),
            prompts[0] if len(prompts) == 1 else json.dumps(prompts),  # type: ignore[arg-type]
            prompt_tokens=sum(len(ids) for _, ids in tokenized),
        )  # fmt: skip
        gate.admit(info.prompt_tokens, sum((sp.max_tokens or 0) * sp.n for sp in params))  # 429 past a limit
        handles: list[RequestHandle] = []
        try:
            for i, (pp, sp) in enumerate(zip(prepared, params)):
                log_request(self.state, f"{base_id}-{i}", pp.text, pp.token_ids, sp)  # --enable-log-requests
                handles.append(engine.add_request(pp, sp, f"{base_id}-{i}", priority=request.priority,
                                                  grammar=grammar, priority_class=priority_class))
        except Exception:
            for h in handles:
                engine.release(h)
            raise
        gens = [gate.outputs(engine.stream(h), i * request.n) for i, h in enumerate(handles)]
        if request.is_streaming:
            return StreamingResponse(
                self._stream(request, raw, engine, base_id, tokenized, gens, info, handles, gate),
                media_type="text/event-stream",
            )
        finals: list[RequestOutput | None] = [None] * len(gens)
        result = await run_to_end(self, raw, self._collect(gens, finals), info, handles, engine)
        if isinstance(result, Response):
            return result
        finals = result
        response = self._response(request, engine, base_id, finals, info)
        info.status = "ok"
        self.audit(raw, info)
        return JSONResponse(gate.annotate(response.model_dump(exclude_none=False)))

    @staticmethod
    async def _collect(gens: list[AsyncIterator[RequestOutput]], finals: list[Any]) -> list[Any]:
        async for i, ro in merge_generators(gens):
            finals[i] = ro
        return finals

    def _response(
        self, request: CompletionRequest, engine: AsyncLLM, base_id: str, finals: list[Any], info: AuditInfo
    ) -> CompletionResponse:
        choices: list[CompletionResponseChoice] = []
        completion_tokens = cached = 0
        decode = engine.tokenizer.decode
        for i, ro in enumerate(finals):
            assert ro is not None
            prompt_text = ro.prompt if ro.prompt is not None else decode(ro.prompt_token_ids)
            cached += ro.num_cached_tokens
            for out in ro.outputs:
                echo = _Echo(prompt_text, ro.prompt_token_ids, ro.prompt_logprobs) if request.echo else None
                part = _choice_part(request, out, echo, 0, _single_decoder(decode))
                completion_tokens += part.num_generated
                info.output_parts.append(part.generated_text)
                choices.append(CompletionResponseChoice(
                    index=i * request.n + out.index, text=part.text, logprobs=part.logprobs,
                    finish_reason=part.finish_reason, stop_reason=part.stop_reason,
                    prompt_logprobs=prompt_logprobs_json(ro.prompt_logprobs) if out.index == 0 else None,
                    prompt_token_ids=list(ro.prompt_token_ids) if request.return_token_ids else None,
                    token_ids=part.generated_ids if request.return_token_ids else None,
                ))  # fmt: skip
        info.completion_tokens = completion_tokens
        usage = UsageInfo(
            prompt_tokens=info.prompt_tokens, completion_tokens=completion_tokens,
            total_tokens=info.prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=cached) if cached else None,
        )  # fmt: skip
        return CompletionResponse(id=base_id, model=self.model_name, choices=choices, usage=usage)

    async def _stream(
        self, request: CompletionRequest, raw: Request, engine: AsyncLLM, base_id: str,
        tokenized: list[tuple[str | None, list[int]]], gens: list[AsyncIterator[RequestOutput]],
        info: AuditInfo, handles: list[RequestHandle], gate: TenantGate,
    ) -> AsyncIterator[str]:  # fmt: skip
        created = int(time.time())
        decode = _single_decoder(engine.tokenizer.decode)
        offsets: dict[int, int] = {}  # choice index -> characters streamed (for text_offset)
        # DELTA outputs carry a prompt's logprobs once, with its first output (of any of its n
        # choices): kept here for the echo of the others.
        prompt_lps: dict[int, PromptLogprobs] = {}
        try:
            async for i, ro in merge_generators(gens):
                if ro.prompt_logprobs is not None:
                    prompt_lps.setdefault(i, ro.prompt_logprobs)
                choices = []
                for out in ro.outputs:
                    index = i * request.n + out.index
                    first = index not in offsets
                    if request.is_scoring and not first:
                        continue  # its one chunk (the prompt, finished) is out
                    echo = None
                    if request.echo and first:
                        text, ids = tokenized[i]
                        echo = _Echo(gate.restore(text or engine.tokenizer.decode(ids)), ids, prompt_lps.get(i))
                    part = _choice_part(request, out, echo, offsets.get(index, 0), decode)
                    offsets[index] = offsets.get(index, 0) + len(part.text)
                    info.completion_tokens += part.num_generated
                    info.output_parts.append(part.generated_text)
                    choices.append(CompletionResponseStreamChoice(
                        index=index, text=part.text, logprobs=part.logprobs, finish_reason=part.finish_reason,
                        stop_reason=part.stop_reason,
                        prompt_token_ids=list(tokenized[i][1]) if request.return_token_ids and first else None,
                        token_ids=part.generated_ids if request.return_token_ids else None,
                    ))  # fmt: skip
                if choices:
                    so_far = (UsageInfo.of(info.prompt_tokens, info.completion_tokens)
                              if request.continuous_usage else None)
                    yield sse_event(CompletionStreamResponse(
                        id=base_id, created=created, model=self.model_name, choices=choices, usage=so_far,
                    ))  # fmt: skip
            if request.include_usage:
                yield sse_event(CompletionStreamResponse(
                    id=base_id, created=created, model=self.model_name, choices=[],
                    usage=UsageInfo.of(info.prompt_tokens, info.completion_tokens),
                ))  # fmt: skip
            info.status = "ok"
        except asyncio.CancelledError:
            info.status = "aborted"
            raise
        except Exception as e:  # noqa: BLE001 - headers are out: report inside the stream
            info.status = failure_status(e)
            yield error_sse(engine_error(e))
        finally:
            for h in handles:
                engine.release(h)
            self.audit(raw, info)
        if (checked := gate.validation_event(base_id, "text_completion")) is not None:
            yield checked
        yield SSE_DONE


@dataclass(slots=True)
class _Echo:
    """A prompt to put in front of a choice's text (echo): its text, ids and logprobs."""

    text: str
    token_ids: list[int]
    logprobs: PromptLogprobs | None  # None: not asked for (or not yet known)


@dataclass(slots=True)
class _ChoicePart:
    text: str
    logprobs: CompletionLogProbs | None
    finish_reason: str | None
    stop_reason: int | str | None
    generated_text: str  # what the model generated (the audit's output)
    generated_ids: list[int]  # its token ids (none for a scoring request: its one sample is dropped)

    @property
    def num_generated(self) -> int:  # completion tokens
        return len(self.generated_ids)


def _choice_part(
    request: CompletionRequest, out: CompletionOutput, echo: _Echo | None, text_offset: int, decode: Any
) -> _ChoicePart:
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
        return _ChoicePart(text, logprobs, "length", None, "", [])
    return _ChoicePart(text, logprobs, out.finish_reason, out.stop_reason, out.text, list(out.token_ids))


def _single_decoder(decode: Any) -> Any:
    cache: dict[int, str] = {}

    def one(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = decode([token_id])
        return cache[token_id]

    return one
