"""The OpenAI-compatible HTTP server: FastAPI app factory, uvicorn runner, `python -m` entry.

    python -m pagedserve.entrypoints.openai.api_server --model MODEL [vLLM flags]

Request path: AccessLogMiddleware (request id, access line) -> HTTPMetricsMiddleware ->
CORSMiddleware -> HTTPLimitsMiddleware (body size/time, concurrency) -> AuthMiddleware (every
route but the public probes) -> TenantMiddleware (tenant policy, rate-limit leases) -> route ->
OpenAIServing* (TenantGate: limits, de-identification, cache salt, output checks) -> AsyncLLM ->
engine core process.

The engine starts in the background once uvicorn is up: until it is ready /health and the
generation routes answer 503. How the server stops (drain on SIGTERM, exit or restart when the
engine process dies) is lifecycle.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import pagedserve
from pagedserve.config import EngineConfig
from pagedserve.core.stats import SchedulerStats
from pagedserve.engine.async_llm import AsyncLLM, FinishedRequestStats
from pagedserve.engine.engine_core_proc import LogSettings
from pagedserve.entrypoints.openai.cli_args import engine_args_from, parse_args
from pagedserve.entrypoints.openai.errors import (
    install_exception_handlers,
)
from pagedserve.entrypoints.openai.lifecycle import (
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    DrainingServer,
    ServerLifecycle,
    engine_restarts,
)
from pagedserve.entrypoints.openai.prompt_bounds import (
    PromptBounds,
    default_max_prompt_chars,
)
from pagedserve.entrypoints.openai.routes import add_openai_routes, add_probe_routes
from pagedserve.entrypoints.openai.serving_engine import ServerState
from pagedserve.entrypoints.openai.slo_admission import SloAdmission
from pagedserve.entrypoints.openai.structured_limits import limits_from_args
from pagedserve.entrypoints.openai.tenancy import Tenancy
from pagedserve.entrypoints.openai.vllm_compat import install_vllm_compat, on_engine_ready
from pagedserve.ops.audit_middleware import AuditMiddleware, audit_log_from_args
from pagedserve.ops.auth import AuthConfig, Authenticator, AuthMiddleware
from pagedserve.ops.conn_limits import RepeatFilter, raise_nofile_limit, uvicorn_limit_kwargs
from pagedserve.ops.http_limits import HTTPLimits, HTTPLimitsMiddleware, cors_kwargs
from pagedserve.ops.logging import AccessLogMiddleware, configure_logging
from pagedserve.ops.metrics import EngineMetrics, HTTPMetricsMiddleware
from pagedserve.ops.tenant_metrics import TenantMetrics
from pagedserve.ops.tenants import TenantMiddleware, load_registry
from pagedserve.worker.cpu_resources import configure_front_threads

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
        if s.prefix_cache_queries < self._prev_queries or s.num_preemptions < self._prev_preemptions:
            self._prev_queries = self._prev_hits = self._prev_preemptions = 0  # a restarted engine
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
    use_builtin_model(args)
    if config is None:
        config = engine_args_from(args).create_engine_config()
    state = server_state(args, config)
    metrics = EngineMetrics(state.served_model_names[0], max_model_len=state.max_model_len)
    tenants = load_registry(getattr(args, "tenant_config", None), args.api_key_file,
                            getattr(args, "max_tenant_labels", None))  # fmt: skip
    state.extra["tenancy"] = Tenancy(tenants, TenantMetrics(metrics.registry), state.served_model_names)
    state.extra["slo"] = SloAdmission(config.scheduler_config.slo, metrics.slo)
    lifecycle = ServerLifecycle(
        state, getattr(args, "shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT_S), engine_restarts(args)
    )
    start = engine_starter(args, config, state, lifecycle, MetricsBridge(metrics))
    app = FastAPI(title="pagedserve", version=pagedserve.__version__, lifespan=lifespan(state, lifecycle, start))
    app.state.server = state
    app.state.lifecycle = lifecycle
    app.state.metrics = metrics
    install_exception_handlers(app)
    install_vllm_compat(app, args, state)  # chat options, request logging, --middleware
    add_probe_routes(app, state, metrics, config.model_config.model)
    add_openai_routes(app, state)
    add_middleware(app, args, state, metrics, tenants)
    return app


def use_builtin_model(args: argparse.Namespace) -> None:
    """No --model: the built-in model (SmolLM2-135M-Instruct, else the demo: builtin_model.py)."""
    if args.model is not None:
        return
    from pagedserve.builtin_model import builtin_model

    builtin = builtin_model()
    args.model = builtin.model
    args.served_model_name = args.served_model_name or [builtin.served_model_name]
    args.override_generation_config = {**builtin.generation_defaults, **(args.override_generation_config or {})}


def server_state(args: argparse.Namespace, config: EngineConfig) -> ServerState:
    """What the routes read, from the flags and the engine config (the engine comes later)."""
    state = ServerState(
        served_model_names=list(args.served_model_name or [config.model_config.served_model_name]),
        max_model_len=config.scheduler_config.max_model_len,
        chat_template=load_chat_template(args.chat_template),
        max_waiting_requests=args.max_waiting_requests,
        audit=audit_log_from_args(args),
        default_sampling_params=dict(config.model_config.generation_defaults),
        bounds=PromptBounds(
            max_prompts=args.max_prompts_per_request, render_timeout_s=args.chat_template_timeout,
            max_prompt_chars=args.max_prompt_chars or default_max_prompt_chars(config.scheduler_config.max_model_len),
            trust_request_chat_template=args.trust_request_chat_template,
        ),
    )  # fmt: skip
    state.extra["structured_output_limits"] = limits_from_args(args)
    if state.default_sampling_params:
        logger.info("requests default to the model's generation config: %s "
                    "(--generation-config vllm turns this off)", state.default_sampling_params)
    return state


def engine_starter(
    args: argparse.Namespace, config: EngineConfig, state: ServerState, lifecycle: ServerLifecycle,
    bridge: MetricsBridge,
) -> Callable[[], Coroutine[Any, Any, None]]:  # fmt: skip
    """The background start of the engine: on success its listeners (metrics, SLO admission,
    lifecycle, stats log) are attached and `state.engine` set; a failure is reported by /health
    and every route."""
    multiprocess = getattr(args, "engine_in_process", False) is False
    slo: SloAdmission = state.extra["slo"]
    level = getattr(args, "log_level", None)  # the engine process logs in the server's format
    log = LogSettings(level, json=getattr(args, "log_format", "json") == "json") if level else None

    async def start_engine() -> None:
        try:
            engine = await AsyncLLM.from_config(config, multiprocess=multiprocess, log=log)
        except Exception as e:  # noqa: BLE001 - reported by /health and every route
            logger.exception("engine start-up failed")
            state.start_error = f"The engine failed to start: {e}"
            lifecycle.on_start_failed(str(e))
            return
        engine.stats_listeners.append(bridge.on_stats)
        engine.finished_listeners.append(bridge.on_finished)
        engine.stats_listeners.append(slo.on_stats)
        engine.finished_listeners.append(slo.on_finished)
        lifecycle.watch(engine)
        on_engine_ready(args, engine)  # --disable-log-stats
        state.engine = engine
        logger.info("engine ready", extra={"engine_pid": engine.client.pid})

    return start_engine


def lifespan(
    state: ServerState, lifecycle: ServerLifecycle, start_engine: Callable[[], Coroutine[Any, Any, None]]
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        starter = asyncio.create_task(start_engine())
        try:
            yield
        finally:
            starter.cancel()
            await lifecycle.close()
            if state.engine is not None:
                await state.engine.shutdown()
            if state.audit is not None:
                state.audit.close()

    return run


def add_middleware(
    app: FastAPI, args: argparse.Namespace, state: ServerState, metrics: EngineMetrics, tenants: Any
) -> None:
    """Added innermost first: the access log wraps everything, auth sits next to the routes."""
    authenticator = Authenticator(AuthConfig(
        api_keys=list(args.api_key or []), api_key_file=args.api_key_file, jwt_secret=args.jwt_secret,
        jwt_public_key=args.jwt_public_key, jwt_audience=args.jwt_audience, jwt_issuer=args.jwt_issuer,
        tenant_claim=args.jwt_tenant_claim, jwt_max_lifetime_s=getattr(args, "jwt_max_lifetime", 86400),
        policy_claim=getattr(args, "jwt_policy_claim", None),
    ))  # fmt: skip
    # tenant policy and its rate-limit leases: inside auth (it reads the principal)
    app.add_middleware(TenantMiddleware, registry=tenants)  # type: ignore[arg-type]
    if authenticator.enabled:
        app.add_middleware(AuthMiddleware, authenticator=authenticator)  # type: ignore[arg-type]
    # Limits outside auth: an unauthenticated flood is counted and bounded too. CORS outside both,
    # so preflights are answered before auth and 401/413/429 carry CORS headers a browser can read.
    limits = HTTPLimits(args.max_request_body_bytes, args.request_body_timeout, args.max_concurrent_requests)
    app.add_middleware(HTTPLimitsMiddleware, limits=limits)  # type: ignore[arg-type]
    app.add_middleware(CORSMiddleware, **cors_kwargs(args))  # type: ignore[arg-type]
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]
    if state.audit is not None:  # outside every middleware that rejects, inside the request ids
        app.add_middleware(AuditMiddleware, log=state.audit, model=state.served_model_names[0])  # type: ignore[arg-type]
    app.add_middleware(AccessLogMiddleware)  # type: ignore[arg-type]


async def serve(args: argparse.Namespace, app: Any | None = None) -> int:
    """Serve until stopped; returns the exit status (non-zero: the engine died)."""
    import uvicorn

    app = app if app is not None else build_app(args)
    soft, hard = raise_nofile_limit()
    logger.info("open-file limit", extra={"nofile_soft": soft, "nofile_hard": hard})
    config = uvicorn.Config(
        app, host=args.host, port=args.port, ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs, root_path=args.root_path or "", log_level=args.uvicorn_log_level,
        access_log=False, log_config=None, timeout_graceful_shutdown=5, **uvicorn_limit_kwargs(args),
    )  # fmt: skip
    lifecycle: ServerLifecycle | None = getattr(app.state, "lifecycle", None)
    if lifecycle is None:
        await uvicorn.Server(config).serve()
        return 0
    server = DrainingServer(config, lifecycle)
    lifecycle.attach(server)
    await server.serve()
    return lifecycle.exit_code


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the server's coroutine on uvloop where it is installed (a declared dependency off
    Windows), else on asyncio's own loop. The front end is one Python process whose event loop
    carries every streamed token: with uvloop it spent 93-106 against 121-133 us of CPU per token
    at 200-300 streams (benchmarks/frontend_stream.py, results/cpu-2026-12-02-frontend-stream/)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_server(args: argparse.Namespace) -> None:
    """Configure logs, build the app (fails fast on a bad model or flags) and serve until stopped."""
    configure_logging(args.log_level, json=args.log_format == "json").addFilter(RepeatFilter())
    if not getattr(args, "engine_in_process", False):  # the engine process gets the other cores
        configure_front_threads()
    logger.info("starting server", extra={"model": args.model, "host": args.host, "port": args.port,
                                          "tls": bool(args.ssl_certfile), "pid": os.getpid()})  # fmt: skip
    try:
        code = run_loop(serve(args))
    except KeyboardInterrupt:  # a plain uvicorn server re-raises SIGINT after its shutdown
        code = 0
    logger.info("server stopped", extra={"exit_code": code})
    if code:
        raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run_server(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
