"""The OpenAI-compatible HTTP server: FastAPI app factory, uvicorn runner, `python -m` entry.

    python -m pagedserve.entrypoints.openai.api_server --model MODEL [vLLM flags]

Request path: AccessLogMiddleware (request id, access line) -> HTTPMetricsMiddleware ->
AuthMiddleware (/v1/*) -> route -> OpenAIServing* -> AsyncLLM -> engine core process.

The engine starts in the background once uvicorn is up: until it is ready /health and the
generation routes answer 503; if the engine process dies they answer 503 again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import pagedserve
from pagedserve.config import EngineConfig
from pagedserve.core.scheduler import SchedulerStats
from pagedserve.engine.async_llm import AsyncLLM, FinishedRequestStats
from pagedserve.engine.core_client import ENV_LOG_JSON, ENV_LOG_LEVEL, EngineDeadError
from pagedserve.entrypoints.openai.cli_args import engine_args_from, parse_args
from pagedserve.entrypoints.openai.errors import (
    BadRequestError,
    ServiceUnavailableError,
    install_exception_handlers,
)
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from pagedserve.entrypoints.openai.responses import (
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from pagedserve.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedserve.entrypoints.openai.serving_completion import OpenAIServingCompletion, ServerState
from pagedserve.entrypoints.openai.structured_limits import limits_from_args
from pagedserve.ops.audit import AuditLog
from pagedserve.ops.auth import AuthConfig, Authenticator, AuthMiddleware
from pagedserve.ops.logging import AccessLogMiddleware, configure_logging
from pagedserve.ops.metrics import CONTENT_TYPE, EngineMetrics, HTTPMetricsMiddleware

logger = logging.getLogger("pagedserve.api_server")


def load_chat_template(value: str | None) -> str | None:
    """--chat-template is a file path or the template text itself."""
    if value is None:
        return None
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


class MetricsBridge:
    """Engine stats (cumulative counters) -> EngineMetrics (which wants deltas)."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self.metrics = metrics
        self._prev_queries = self._prev_hits = self._prev_preemptions = 0

    def on_stats(self, s: SchedulerStats) -> None:
        dq = max(0, s.prefix_cache_queries - self._prev_queries)
        dh = min(dq, max(0, s.prefix_cache_hits - self._prev_hits))
        dp = max(0, s.num_preemptions - self._prev_preemptions)
        self._prev_queries, self._prev_hits = s.prefix_cache_queries, s.prefix_cache_hits
        self._prev_preemptions = s.num_preemptions
        self.metrics.record_scheduler_stats(
            s.num_running, s.num_waiting, s.num_swapped, min(1.0, max(0.0, s.kv_cache_usage)), dq, dh, dp
        )
        if s.num_scheduled_tokens:
            self.metrics.record_iteration(s.num_scheduled_tokens)

    def on_finished(self, f: FinishedRequestStats) -> None:
        self.metrics.record_request_finished(
            f.finished_reason, f.prompt_tokens, f.generation_tokens, f.ttft, f.tpot, max(0.0, f.e2e),
            f.queue_time,
        )


def build_app(args: argparse.Namespace, config: EngineConfig | None = None) -> FastAPI:
    """The app for parsed CLI `args`. The engine starts in the app's lifespan (in the background)."""
    if args.model is None:
        from pagedserve.testing.checkpoints import build_demo_checkpoint

        args.model = build_demo_checkpoint()
        args.served_model_name = args.served_model_name or ["pagedserve-demo"]
    if config is None:
        config = engine_args_from(args).create_engine_config()
    names = list(args.served_model_name or [config.model_config.served_model_name])
    state = ServerState(
        served_model_names=names,
        max_model_len=config.scheduler_config.max_model_len,
        chat_template=load_chat_template(args.chat_template),
        max_waiting_requests=args.max_waiting_requests,
        audit=AuditLog(args.audit_log) if args.audit_log else None,
        default_sampling_params=dict(config.model_config.generation_defaults),
    )
    state.extra["structured_output_limits"] = limits_from_args(args)
    if state.default_sampling_params:
        logger.info("requests default to the model's generation config: %s "
                    "(--generation-config vllm turns this off)", state.default_sampling_params)
    metrics = EngineMetrics(names[0], max_model_len=state.max_model_len)
    bridge = MetricsBridge(metrics)
    multiprocess = getattr(args, "engine_in_process", False) is False

    async def start_engine() -> None:
        try:
            engine = await AsyncLLM.from_config(config, multiprocess=multiprocess)
        except Exception as e:  # noqa: BLE001 - reported by /health and every route
            logger.exception("engine start-up failed")
            state.start_error = f"The engine failed to start: {e}"
            return
        engine.stats_listeners.append(bridge.on_stats)
        engine.finished_listeners.append(bridge.on_finished)
        state.engine = engine
        logger.info("engine ready", extra={"engine_pid": engine.client.pid})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starter = asyncio.create_task(start_engine())
        try:
            yield
        finally:
            starter.cancel()
            if state.engine is not None:
                await state.engine.shutdown()
            if state.audit is not None:
                state.audit.close()

    app = FastAPI(title="pagedserve", version=pagedserve.__version__, lifespan=lifespan)
    app.state.server = state
    app.state.metrics = metrics
    install_exception_handlers(app)
    completion = OpenAIServingCompletion(state)
    chat = OpenAIServingChat(state)

    @app.get("/health")
    async def health() -> Response:
        engine = state.engine
        if engine is None or not engine.is_alive:
            reason = "starting" if engine is None and state.start_error is None else "unavailable"
            return JSONResponse({"status": reason}, status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": pagedserve.__version__})

    @app.get("/metrics")
    async def render_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [
            ModelCard(id=n, root=config.model_config.model, max_model_len=state.max_model_len) for n in names
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def generation(work: Awaitable[Response]) -> Response:
        """A generation route: a dead engine is a 503, input the engine refuses a 400."""
        try:
            return await work
        except EngineDeadError as e:
            raise ServiceUnavailableError(f"The engine is not running: {e}") from None
        except ValueError as e:
            raise BadRequestError(str(e)) from None

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        return await generation(completion.create_completion(request, raw))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        return await generation(chat.create_chat_completion(request, raw))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeCompletionRequest | TokenizeChatRequest) -> JSONResponse:
        completion.check_model(request.model)
        engine = completion.engine()
        if isinstance(request, TokenizeChatRequest):
            try:
                text = engine.apply_chat_template(
                    [m.model_dump(exclude_none=True, exclude={"content"}) | {"content": m.text()}
                     for m in request.messages],
                    chat_template=request.chat_template or state.chat_template,
                    add_generation_prompt=request.add_generation_prompt,
                    continue_final_message=request.continue_final_message,
                    chat_template_kwargs=request.chat_template_kwargs,
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001
                raise BadRequestError(
                    f"The chat template failed on these messages: {e}", "messages"
                ) from None
        else:
            text = request.prompt
        ids = list(engine.tokenizer.encode(text, add_special_tokens=request.add_special_tokens))
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        resp = TokenizeResponse(
            count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs
        )
        return JSONResponse(resp.model_dump())

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> JSONResponse:
        completion.check_model(request.model)
        engine = completion.engine()
        bad = [t for t in request.tokens if t >= engine.vocab_size]
        if bad:
            raise BadRequestError(
                f"token ids must be in [0, {engine.vocab_size - 1}], got {bad[:5]}", "tokens"
            )
        return JSONResponse(DetokenizeResponse(prompt=engine.tokenizer.decode(request.tokens)).model_dump())

    # Added innermost first: the access log wraps everything, auth sits next to the routes.
    authenticator = Authenticator(AuthConfig(
        api_keys=list(args.api_key or []), api_key_file=args.api_key_file, jwt_secret=args.jwt_secret,
        jwt_public_key=args.jwt_public_key, jwt_audience=args.jwt_audience, jwt_issuer=args.jwt_issuer,
        tenant_claim=args.jwt_tenant_claim,
    ))  # fmt: skip
    if authenticator.enabled:
        app.add_middleware(AuthMiddleware, authenticator=authenticator)  # type: ignore[arg-type]
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]
    app.add_middleware(AccessLogMiddleware)  # type: ignore[arg-type]
    return app


async def serve(args: argparse.Namespace, app: Any | None = None) -> None:
    import uvicorn

    app = app if app is not None else build_app(args)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs, root_path=args.root_path or "", log_level=args.uvicorn_log_level,
        access_log=False, log_config=None, timeout_graceful_shutdown=5,
    )  # fmt: skip
    await uvicorn.Server(config).serve()


def run_server(args: argparse.Namespace) -> None:
    """Configure logs, build the app (fails fast on a bad model or flags) and serve until stopped."""
    configure_logging(args.log_level, json=args.log_format == "json")
    os.environ[ENV_LOG_LEVEL] = args.log_level
    os.environ[ENV_LOG_JSON] = "1" if args.log_format == "json" else "0"
    logger.info("starting server", extra={"model": args.model, "host": args.host, "port": args.port,
                                          "tls": bool(args.ssl_certfile), "pid": os.getpid()})  # fmt: skip
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT after its graceful shutdown
        logger.info("server stopped")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run_server(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
