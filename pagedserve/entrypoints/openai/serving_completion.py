"""/v1/completions (the shared serving base is serving_engine.py).

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
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedserve.engine.async_llm import AsyncLLM, RequestHandle
from pagedserve.engine.request_builder import PreparedPrompt
from pagedserve.entrypoints.openai.completion_choices import Echo, choice_part, single_decoder
from pagedserve.entrypoints.openai.prompt_bounds import tokenize_prompt
from pagedserve.entrypoints.openai.protocol import (
    CompletionRequest,
)
from pagedserve.entrypoints.openai.responses import (
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    PromptTokenUsageInfo,
    UsageInfo,
    sse_event,
)
from pagedserve.entrypoints.openai.serving_engine import (
    AuditInfo,
    OpenAIServing,
    prompt_logprobs_json,
    run_to_end,
)
from pagedserve.entrypoints.openai.slo_admission import priority_class_of
from pagedserve.entrypoints.openai.tenancy import TenantGate
from pagedserve.entrypoints.openai.vllm_compat import log_request
from pagedserve.outputs import PromptLogprobs, RequestOutput

T = TypeVar("T")


async def merge_generators(gens: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive; closing this one cancels them all.
    One iterator (a single prompt, the usual request) is read directly: no task, no queue hop
    per item."""
    if len(gens) == 1:
        only = gens[0]
        try:
            async for value in only:
                yield 0, value
        finally:
            close = getattr(only, "aclose", None)
            if close is not None:
                await close()
        return
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
            body = self._stream(request, engine, base_id, tokenized, gens, info, gate)
            return StreamingResponse(
                self.stream_with_ending(raw, body, info, lambda: _release(engine, handles), gate, base_id,
                                        "text_completion"),
                media_type="text/event-stream",
            )  # fmt: skip
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
                echo = Echo(prompt_text, ro.prompt_token_ids, ro.prompt_logprobs) if request.echo else None
                part = choice_part(request, out, echo, 0, single_decoder(decode))
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
        self, request: CompletionRequest, engine: AsyncLLM, base_id: str,
        tokenized: list[tuple[str | None, list[int]]], gens: list[AsyncIterator[RequestOutput]],
        info: AuditInfo, gate: TenantGate,
    ) -> AsyncIterator[str]:  # fmt: skip
        """The events of a streamed completion (stream_with_ending ends it)."""
        created = int(time.time())
        decode = single_decoder(engine.tokenizer.decode)
        offsets: dict[int, int] = {}  # choice index -> characters streamed (for text_offset)
        # DELTA outputs carry a prompt's logprobs once, with its first output (of any of its n
        # choices): kept here for the echo of the others.
        prompt_lps: dict[int, PromptLogprobs] = {}
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
                    echo = Echo(gate.restore(text or engine.tokenizer.decode(ids)), ids, prompt_lps.get(i))
                part = choice_part(request, out, echo, offsets.get(index, 0), decode)
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


def _release(engine: AsyncLLM, handles: list[RequestHandle]) -> None:
    for handle in handles:
        engine.release(handle)
