"""The server's routes, in two groups that build_app installs (api_server.py):

    add_probe_routes    /health, /ping (vLLM's liveness probe), /version, /metrics, /v1/models
    add_openai_routes   /v1/completions, /v1/chat/completions, /tokenize, /detokenize

A route only parses its body (pydantic) and hands it to its OpenAIServing* object; a dead engine
becomes a 503 and input the engine refuses a 400 (`generation`).
"""

from __future__ import annotations

from collections.abc import Awaitable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import pagedserve
from pagedserve.engine.messages import EngineDeadError
from pagedserve.entrypoints.openai.errors import BadRequestError, ServiceUnavailableError
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from pagedserve.entrypoints.openai.responses import ModelCard, ModelList
from pagedserve.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedserve.entrypoints.openai.serving_engine import ServerState
from pagedserve.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from pagedserve.ops.metrics import CONTENT_TYPE, EngineMetrics


def add_probe_routes(app: FastAPI, state: ServerState, metrics: EngineMetrics, model_root: str) -> None:
    async def health() -> Response:
        engine = state.engine
        if state.lifecycle_status is not None:  # draining / restarting
            return JSONResponse({"status": state.lifecycle_status}, status_code=503)
        if engine is None or not engine.is_alive:
            reason = "starting" if engine is None and state.start_error is None else "unavailable"
            return JSONResponse({"status": reason}, status_code=503)
        return Response(status_code=200)

    async def version() -> JSONResponse:
        return JSONResponse({"version": pagedserve.__version__})

    async def render_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def models() -> JSONResponse:
        cards = [ModelCard(id=n, root=model_root, max_model_len=state.max_model_len) for n in state.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ping", health, methods=["GET", "POST"])  # vLLM's (SageMaker POSTs it)
    app.add_api_route("/version", version, methods=["GET"])
    app.add_api_route("/metrics", render_metrics, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])


async def generation(work: Awaitable[Response]) -> Response:
    """A generation route: a dead engine is a 503, input the engine refuses a 400."""
    try:
        return await work
    except EngineDeadError as e:
        raise ServiceUnavailableError(f"The engine is not running: {e}") from None
    except ValueError as e:
        raise BadRequestError(str(e)) from None


def add_openai_routes(app: FastAPI, state: ServerState) -> None:
    completion = OpenAIServingCompletion(state)
    chat = OpenAIServingChat(state)
    tokenization = OpenAIServingTokenization(state)

    async def completions(request: CompletionRequest, raw: Request) -> Response:
        return await generation(completion.create_completion(request, raw))

    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        return await generation(chat.create_chat_completion(request, raw))

    async def tokenize(request: TokenizeCompletionRequest | TokenizeChatRequest) -> JSONResponse:
        return JSONResponse((await tokenization.tokenize(request)).model_dump())

    async def detokenize(request: DetokenizeRequest) -> JSONResponse:
        return JSONResponse((await tokenization.detokenize(request)).model_dump())

    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
