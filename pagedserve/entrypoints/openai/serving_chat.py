"""/v1/chat/completions: messages -> chat template -> one engine request with n samples.

Streaming sends, per choice, a first delta with the role, then content deltas, the last one with
finish_reason; with stream_options.include_usage a final chunk with empty choices carries the
usage; the stream ends with `data: [DONE]`.

A reply is split by the server's parsers (chat_output.py): --reasoning-parser moves <think> text to
reasoning_content, and with --enable-auto-tool-choice (tool_choice "auto", or unset with tools)
--tool-call-parser turns the model's tool-call markup into `tool_calls` (finish_reason
"tool_calls"). A forced tool_choice (named or "required") goes through tool_calls.py instead.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedserve.engine.async_llm import AsyncLLM, RequestHandle
from pagedserve.entrypoints.openai.errors import BadRequestError
from pagedserve.entrypoints.openai.prompt_bounds import encode, render_chat_template
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    clamp_logprob,
)
from pagedserve.entrypoints.openai.responses import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
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
from pagedserve.entrypoints.openai.tool_calls import ToolCallStream, forces_tool_calls, parse_tool_calls
from pagedserve.entrypoints.openai.tool_calls import finish_reason as tool_finish_reason
from pagedserve.entrypoints.openai.vllm_compat import (
    ChatOptions,
    chat_options,
    content_format_for,
    log_request,
)
from pagedserve.outputs import Logprob, RequestOutput

AUTO_TOOLS_NEED_FLAGS = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]], num_top: int, decode: Any
) -> ChatCompletionLogProbs:
    """One entry per generated token: its text, logprob, UTF-8 bytes, and the top `num_top`."""

    def entry(token_id: int, lp: Logprob) -> ChatCompletionLogProb:
        text = lp.decoded_token if lp.decoded_token is not None else decode([token_id])
        return ChatCompletionLogProb(token=text, logprob=clamp_logprob(lp.logprob), bytes=list(text.encode()))

    content: list[ChatCompletionLogProbsContent] = []
    for token_id, d in zip(token_ids, logprobs):
        chosen = d.get(token_id) or Logprob(float("-inf"))
        c = entry(token_id, chosen)
        top = sorted(d.items(), key=lambda kv: kv[1].rank or 0)[:num_top] if num_top else []
        content.append(ChatCompletionLogProbsContent(
            token=c.token, logprob=c.logprob, bytes=c.bytes, top_logprobs=[entry(t, lp) for t, lp in top],
        ))  # fmt: skip
    return ChatCompletionLogProbs(content=content)


class OpenAIServingChat(OpenAIServing):
    async def render(self, engine: AsyncLLM, request: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The prompt text the chat template makes of the messages, and its token ids (both
        bounded and computed off the event loop: prompt_bounds.py)."""
        bounds = self.state.bounds
        bounds.check_request_template(request.chat_template, request.chat_template_kwargs)
        template = request.chat_template or self.state.chat_template
        content_format = content_format_for(
            chat_options(self.state), template or getattr(engine.tokenizer, "chat_template", None))
        text = await render_chat_template(
            engine, bounds,
            messages=request.messages_for_template(content_format),
            chat_template=template,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tools=request.tools_for_template(),
            chat_template_kwargs=request.chat_template_kwargs,
        )  # fmt: skip
        ids = await encode(engine.tokenizer, bounds, text, "messages", add_special_tokens=request.add_special_tokens)
        return text, ids

    @staticmethod
    def auto_tools(request: ChatCompletionRequest, options: ChatOptions) -> bool:
        """Whether the reply is parsed for tool calls (tool_choice "auto", or unset with tools, and
        the server runs a tool-call parser); an explicit "auto" without one is a 400, as vLLM."""
        if request.tool_choice == "auto" and options.tool_parser is None:
            raise BadRequestError(AUTO_TOOLS_NEED_FLAGS, param="tool_choice")
        return options.tool_parser is not None and bool(request.tools) and request.tool_choice in (None, "auto")

    async def create_chat_completion(self, request: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(request.model)
        options = chat_options(self.state)
        auto_tools = self.auto_tools(request, options)
        if auto_tools and options.tools_need_special_tokens:
            request.skip_special_tokens = False  # the format's markers are special tokens
        engine = self.engine()
        gate = self.tenant_gate(raw, request, "/v1/chat/completions")
        self.state.bounds.check_num_prompts(1, request.n)
        priority_class = priority_class_of(raw, request.priority_class)
        self.check_load(engine, 1, priority_class)
        gate.redact_messages(request)  # before the template and the tokenizer
        text, ids = await self.render(engine, request)
        prepared = self.prepare_prompt(engine, request, gate.salted({"prompt": text, "prompt_token_ids": ids}))
        ids = prepared.token_ids
        params = self.sampling_params(request, len(ids), request.is_streaming)
        gate.cap(params)
        self.prepare_params(engine, request, params)
        grammar = await self.compile_grammar(engine, request, params)
        request_id = self.request_id(raw, "chatcmpl")
        log_request(self.state, request_id, text, ids, params)
        info = AuditInfo(request_id, time.time(), text, prompt_tokens=len(ids))
        gate.admit(len(ids), (params.max_tokens or 0) * params.n)  # 429 past a tenant limit
        handle = engine.add_request(
            prepared, params, request_id, request.priority,
            grammar=grammar, priority_class=priority_class,
        )  # fmt: skip
        gen = gate.outputs(engine.stream(handle))
        role = options.response_role
        echo = ""
        if request.echo and request.messages[-1].role == role:
            echo = gate.restore(request.messages[-1].text())
        if request.is_streaming:
            body = self._stream(request, engine, handle, gen, info, echo, auto_tools)
            return StreamingResponse(
                self.stream_with_ending(raw, body, info, lambda: engine.release(handle), gate, request_id,
                                        "chat.completion.chunk"),
                media_type="text/event-stream",
            )  # fmt: skip
        result = await run_to_end(self, raw, _last(gen), info, [handle], engine)
        if isinstance(result, Response):
            return result
        final = result
        choices = []
        completion_tokens = 0
        for out in final.outputs:
            logprobs = None
            if request.logprobs:
                logprobs = chat_logprobs(out.token_ids, out.logprobs or [], request.top_logprobs or 0,
                                         engine.tokenizer.decode)  # fmt: skip
            completion_tokens += len(out.token_ids)
            info.output_parts.append(out.text)
            message = ChatMessage(role=role, content=echo + out.text)
            reason = out.finish_reason
            parser = None if forces_tool_calls(request) else options.choice_output(auto_tools)
            if forces_tool_calls(request):
                calls = parse_tool_calls(request, out.text)
                if calls is not None:
                    message = ChatMessage(role=role, content=None, tool_calls=calls)
                reason = tool_finish_reason(request, reason, calls is not None)
            elif parser is not None:
                message = parser.whole(role, out.text)
                if echo:
                    message.content = echo + (message.content or "")
                if parser.tools_called and reason == "stop":
                    reason = "tool_calls"
            choices.append(ChatCompletionResponseChoice(
                index=out.index, message=message, logprobs=logprobs,
                finish_reason=reason, stop_reason=out.stop_reason,
                token_ids=list(out.token_ids) if request.return_token_ids else None,
            ))  # fmt: skip
        info.completion_tokens = completion_tokens
        cached = final.num_cached_tokens
        usage = UsageInfo(
            prompt_tokens=len(ids), completion_tokens=completion_tokens, total_tokens=len(ids) + completion_tokens,
            prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=cached) if cached else None,
        )  # fmt: skip
        response = ChatCompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=usage,
            prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs),
            prompt_token_ids=list(ids) if request.return_token_ids else None,
        )  # fmt: skip
        info.status = "ok"
        self.audit(raw, info)
        return JSONResponse(gate.annotate(response.model_dump()))

    async def _stream(
        self, request: ChatCompletionRequest, engine: AsyncLLM, handle: RequestHandle,
        gen: AsyncIterator[RequestOutput], info: AuditInfo, echo: str, auto_tools: bool,
    ) -> AsyncIterator[str]:  # fmt: skip
        """The events of a streamed chat completion (stream_with_ending ends it)."""
        created = int(time.time())
        options = chat_options(self.state)
        request_id = handle.request_id

        def chunk(choices: list[ChatCompletionResponseStreamChoice], usage: UsageInfo | None = None,
                  prompt_token_ids: list[int] | None = None) -> str:  # fmt: skip
            if usage is None and request.continuous_usage:  # the usage so far on every chunk
                usage = UsageInfo.of(info.prompt_tokens, info.completion_tokens)
            return sse_event(ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage,
                prompt_token_ids=prompt_token_ids,
            ))  # fmt: skip

        tool_streams: dict[int, ToolCallStream] | None = {} if forces_tool_calls(request) else None
        parsers = None if tool_streams is not None else {i: options.choice_output(auto_tools) for i in range(request.n)}
        sent_ids = False
        # The role comes first, once per choice (as OpenAI), with the echoed content if any.
        yield chunk([
            ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role=options.response_role,
                                                                           content=echo))
            for i in range(request.n)
        ])  # fmt: skip
        async for ro in gen:
            choices = []
            for out in ro.outputs:
                if not out.text and not out.token_ids and out.finish_reason is None:
                    continue
                logprobs = None
                if request.logprobs:
                    logprobs = chat_logprobs(out.token_ids, out.logprobs or [], request.top_logprobs or 0,
                                             engine.tokenizer.decode)  # fmt: skip
                info.completion_tokens += len(out.token_ids)
                info.output_parts.append(out.text)
                delta: DeltaMessage | None = DeltaMessage(content=out.text)
                reason = out.finish_reason
                if tool_streams is not None:
                    stream = tool_streams.setdefault(out.index, ToolCallStream(request))
                    delta = stream.delta(out.text, reason is not None)
                    if reason is not None:
                        reason = tool_finish_reason(request, reason, stream.parsed)
                elif parsers is not None and (parser := parsers.get(out.index)) is not None:
                    delta = parser.delta(out.text, reason is not None)
                    if reason == "stop" and parser.tools_called:
                        reason = "tool_calls"
                if delta is None and reason is None and logprobs is None:
                    continue
                choices.append(ChatCompletionResponseStreamChoice(
                    index=out.index, delta=delta or DeltaMessage(), logprobs=logprobs,
                    finish_reason=reason, stop_reason=out.stop_reason,
                    token_ids=list(out.token_ids) if request.return_token_ids else None,
                ))  # fmt: skip
            if choices:
                # return_token_ids: the prompt's ids ride on the first chunk that carries tokens
                first_ids = list(ro.prompt_token_ids) if request.return_token_ids and not sent_ids else None
                sent_ids = sent_ids or first_ids is not None
                yield chunk(choices, prompt_token_ids=first_ids)
        if request.include_usage:
            yield chunk([], UsageInfo.of(info.prompt_tokens, info.completion_tokens))


async def _last(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    last: RequestOutput | None = None
    async for ro in gen:
        last = ro
    assert last is not None
    return last
