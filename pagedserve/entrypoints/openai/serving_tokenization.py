"""/tokenize and /detokenize (vLLM's extra routes): authenticated like /v1 (AuthMiddleware denies
by default); templates and long texts are rendered and tokenized off the event loop under the
server's bounds (prompt_bounds.py)."""

from __future__ import annotations

from pagedserve.entrypoints.openai.errors import BadRequestError
from pagedserve.entrypoints.openai.prompt_bounds import decode, encode, render_chat_template
from pagedserve.entrypoints.openai.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from pagedserve.entrypoints.openai.responses import DetokenizeResponse, TokenizeResponse
from pagedserve.entrypoints.openai.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self.check_model(request.model)
        engine = self.engine()
        bounds = self.state.bounds
        if isinstance(request, TokenizeChatRequest):
            bounds.check_request_template(request.chat_template, request.chat_template_kwargs)
            text = await render_chat_template(
                engine, bounds,
                messages=[m.model_dump(exclude_none=True, exclude={"content"}) | {"content": m.text()}
                          for m in request.messages],
                chat_template=request.chat_template or self.state.chat_template,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                tools=[t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None,
                chat_template_kwargs=request.chat_template_kwargs,
            )  # fmt: skip
            param = "messages"
        else:
            text, param = request.prompt, "prompt"
        ids = await encode(engine.tokenizer, bounds, text, param, add_special_tokens=request.add_special_tokens)
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.state.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        engine = self.engine()
        bad = [t for t in request.tokens if t >= engine.vocab_size]
        if bad:
            raise BadRequestError(f"token ids must be in [0, {engine.vocab_size - 1}], got {bad[:5]}", "tokens")
        return DetokenizeResponse(prompt=await decode(engine.tokenizer, list(request.tokens)))
