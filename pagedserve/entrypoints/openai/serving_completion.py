"""/v1/completions, and `OpenAIServing`: what both generation routes share (model check, engine
state, load shedding, sampling params, disconnect handling, audit).

One HTTP request with k prompts and n samples runs k engine requests "<id>-<i>" (each with n
children); choice index = i * n + sample index, as vLLM numbers them.
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
from pagedserve.engine.core_client import EngineDeadError
from pagedserve.entrypoints.openai.errors import (
    BadRequestError,
    NotFoundError,
    OpenAIError,
    ServiceUnavailableError,
    error_sse,
    overloaded,
)
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
from pagedserve.ops.audit import AuditLog
from pagedserve.outputs import Logprob, PromptLogprobs, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

T = TypeVar("T")


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


@dataclass(slots=True)
class AuditInfo:
    request_id: str
    arrival_wall: float
    input: str | list[int] | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_parts: list[str] = field(default_factory=list)
    status: str = "error"


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
        engine = self.state.engine
        if engine is None:
            msg = self.state.start_error or "The engine is starting; retry shortly."
            raise ServiceUnavailableError(msg, retry_after_s=None if self.state.start_error else 5)
        if not engine.is_alive:
            raise ServiceUnavailableError("The engine is not running.")
        return engine

    def check_load(self, engine: AsyncLLM, num_new: int) -> None:
        """Load shedding: 429 once the waiting queue would pass --max-waiting-requests."""
        limit = self.state.max_waiting_requests
        if limit is None:
            return
        waiting = engine.num_waiting_estimate
        if waiting + num_new > limit:
            raise overloaded(
                f"Too many requests waiting ({waiting}, limit {limit}); retry later.", retry_after_s=1
            )

    def sampling_params(self, request: _SamplingRequest, prompt_len: int, stream: bool) -> SamplingParams:
        max_len = self.state.max_model_len
        if prompt_len > max_len:
            raise BadRequestError(
                f"This model's maximum context length is {max_len} tokens, but the prompt has "
                f"{prompt_len} tokens. Please shorten the prompt.", param="prompt",
            )  # fmt: skip
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

    def request_id(self, raw: Request, prefix: str) -> str:
        rid = getattr(raw.state, "request_id", None)
        return f"{prefix}-{rid}" if rid else random_id(prefix)

    def tenant(self, raw: Request) -> str | None:
        return getattr(getattr(raw.state, "principal", None), "tenant", None)

    def audit(self, raw: Request, info: AuditInfo) -> None:
        log = self.state.audit
        if log is None:
            return
        log.record(
            request_id=info.request_id, tenant=self.tenant(raw), model=self.model_name,
            arrival_time=info.arrival_wall, finish_time=time.time(), prompt_tokens=info.prompt_tokens,
            completion_tokens=info.completion_tokens, status=info.status, input=info.input,
            output="".join(info.output_parts),
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
            task.cancel()
            raise asyncio.CancelledError("client disconnected")
        return task.result()


async def run_to_end(
    serving: OpenAIServing, raw: Request, work: Awaitable[T], info: AuditInfo,
    handles: Sequence[RequestHandle], engine: AsyncLLM,
) -> T | JSONResponse:
    """Awaits a non-streamed request's outputs. A client that disconnects has its requests
    aborted (audited as such); an engine failure becomes its OpenAI error response; the handles
    are released on every path."""
    try:
        return await serving.until_disconnect(raw, work)
    except asyncio.CancelledError:
        info.status = "aborted"
        serving.audit(raw, info)
        raise
    except Exception as e:  # noqa: BLE001 - every engine failure becomes an OpenAI error
        serving.audit(raw, info)
        return engine_error(e).to_response()
    finally:
        for handle in handles:
            engine.release(handle)


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
        out.top_logprobs.append({
            (lp.decoded_token if lp.decoded_token is not None else decode(t)): clamp_logprob(lp.logprob)
            for t, lp in top
        })  # fmt: skip
    return out


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw: Request) -> Response:
        self.check_model(request.model)
        engine = self.engine()
        prompts = request.prompts()
        self.check_load(engine, len(prompts))
        tokenized: list[tuple[str | None, list[int]]] = []
        for p in prompts:
            text, ids = engine.tokenize_prompt(p)
            if request.truncate_prompt_tokens is not None:
                ids = ids[-request.truncate_prompt_tokens :]
            tokenized.append((text, ids))
        params = [self.sampling_params(request, len(ids), request.is_streaming) for _, ids in tokenized]
        for (_, ids), sp in zip(tokenized, params):
            try:
                engine.validate(ids, sp)
            except ValueError as e:
                raise BadRequestError(str(e), param="prompt") from None
        base_id = self.request_id(raw, "cmpl")
        info = AuditInfo(
            base_id, time.time(),
            prompts[0] if len(prompts) == 1 else json.dumps(prompts),  # type: ignore[arg-type]
            prompt_tokens=sum(len(ids) for _, ids in tokenized),
        )  # fmt: skip
        handles: list[RequestHandle] = []
        try:
            for i, ((t, ids), sp) in enumerate(zip(tokenized, params)):
                prompt: Any = {"prompt_token_ids": ids, **({"prompt": t} if t else {})}
                handles.append(engine.add_request(prompt, sp, f"{base_id}-{i}", priority=request.priority))
        except Exception:
            for h in handles:
                engine.release(h)
            raise
        gens = [engine.stream(h) for h in handles]
        if request.is_streaming:
            return StreamingResponse(
                self._stream(request, raw, engine, base_id, tokenized, gens, info, handles),
                media_type="text/event-stream",
            )
        finals: list[RequestOutput | None] = [None] * len(gens)
        result = await run_to_end(self, raw, self._collect(gens, finals), info, handles, engine)
        if isinstance(result, JSONResponse):
            return result
        finals = result
        response = self._response(request, engine, base_id, finals, info)
        info.status = "ok"
        self.audit(raw, info)
        return JSONResponse(response.model_dump(exclude_none=False))

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
                prefix = prompt_text if request.echo else ""
                text = prefix + out.text
                logprobs = None
                if request.logprobs is not None:
                    ids: list[int] = []
                    lps: list[dict[int, Logprob] | None] = []
                    if request.echo:
                        ids += ro.prompt_token_ids
                        lps += list(ro.prompt_logprobs or [None] * len(ro.prompt_token_ids))
                    ids += out.token_ids
                    lps += list(out.logprobs or [])
                    logprobs = completion_logprobs(ids, lps, request.logprobs, 0, _single_decoder(decode))
                completion_tokens += len(out.token_ids)
                info.output_parts.append(out.text)
                choices.append(CompletionResponseChoice(
                    index=i * request.n + out.index, text=text, logprobs=logprobs,
                    finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                    prompt_logprobs=prompt_logprobs_json(ro.prompt_logprobs) if out.index == 0 else None,
                    prompt_token_ids=list(ro.prompt_token_ids) if request.return_token_ids else None,
                    token_ids=list(out.token_ids) if request.return_token_ids else None,
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
        info: AuditInfo, handles: list[RequestHandle],
    ) -> AsyncIterator[str]:  # fmt: skip
        created = int(time.time())
        decode = _single_decoder(engine.tokenizer.decode)
        offsets: dict[int, int] = {}  # choice index -> characters streamed (for text_offset)
        try:
            async for i, ro in merge_generators(gens):
                choices = []
                for out in ro.outputs:
                    index = i * request.n + out.index
                    first = index not in offsets  # return_token_ids: prompt ids ride on the first chunk
                    text = out.text
                    ids = list(out.token_ids)
                    lps: list[dict[int, Logprob] | None] = list(out.logprobs or [])
                    if request.echo and index not in offsets:
                        prompt_text = tokenized[i][0] or engine.tokenizer.decode(tokenized[i][1])
                        text = prompt_text + text
                        if request.logprobs is not None:
                            ids = tokenized[i][1] + ids
                            no_rows: list[dict[int, Logprob] | None] = [None] * len(tokenized[i][1])
                            lps = no_rows + lps
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = completion_logprobs(
                            ids, lps, request.logprobs, offsets.get(index, 0), decode
                        )
                    offsets[index] = offsets.get(index, 0) + len(text)
                    info.completion_tokens += len(out.token_ids)
                    info.output_parts.append(out.text)
                    choices.append(CompletionResponseStreamChoice(
                        index=index, text=text, logprobs=logprobs, finish_reason=out.finish_reason,
                        stop_reason=out.stop_reason,
                        prompt_token_ids=list(tokenized[i][1]) if request.return_token_ids and first else None,
                        token_ids=list(out.token_ids) if request.return_token_ids else None,
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
            yield error_sse(engine_error(e))
        finally:
            for h in handles:
                engine.release(h)
            self.audit(raw, info)
        yield SSE_DONE


def _single_decoder(decode: Any) -> Any:
    cache: dict[int, str] = {}

    def one(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = decode([token_id])
        return cache[token_id]

    return one
