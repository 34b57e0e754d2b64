"""The router's FastAPI app and `pagedserve router --config router.yaml [--host H] [--port P]`.

Routes: the server's generation routes (/v1/chat/completions, /v1/completions, streamed or not),
/v1/models, /tokenize, /detokenize forwarded; the router's own /health (200 while any primary
backend takes traffic, with per-region detail) and /metrics. Clients authenticate as on the
server (config `auth:`, plus PAGEDSERVE_API_KEYS / VLLM_API_KEY); a tenant may be pinned to
regions (`tenants:`).

Reload: SIGHUP, or a change of the config file (checked every second), re-reads it. A valid file is
applied in place (pool.apply: kept backends keep their state, in-flight requests finish on removed
ones); an invalid one is logged and counted, and the running config stays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import pagedserve
from pagedserve.entrypoints.openai.errors import BadRequestError, install_exception_handlers
from pagedserve.ops.auth import AuthConfig, Authenticator, AuthMiddleware, Principal
from pagedserve.router.config import ConfigError, RouterConfig, load_config
from pagedserve.router.metrics import CONTENT_TYPE
from pagedserve.router.pool import Pool
from pagedserve.router.probes import probe_all, probe_loop
from pagedserve.router.proxy import Forwarder

logger = logging.getLogger("pagedserve.router")
WATCH_INTERVAL_S = 1.0


class LiveAuthenticator(Authenticator):
    """An Authenticator whose credentials a reload can replace under the running middleware."""

    def __init__(self, config: AuthConfig) -> None:
        super().__init__(config)
        self.current = Authenticator(config)

    @property
    def enabled(self) -> bool:
        return self.current.enabled

    def authenticate(self, authorization_header: str | None) -> Principal:
        return self.current.authenticate(authorization_header)


class Router:
    def __init__(self, config: RouterConfig, config_path: str | Path | None = None) -> None:
        self.forwarder = Forwarder(config)
        self.auth = LiveAuthenticator(config.auth.to_auth_config())
        self.config_path = Path(config_path) if config_path is not None else None
        self._digest = self._file_digest()

    @property
    def pool(self) -> Pool:
        return self.forwarder.pool

    def _file_digest(self) -> str | None:
        if self.config_path is None:
            return None
        try:
            return hashlib.sha256(self.config_path.read_bytes()).hexdigest()
        except OSError:
            return None

    def reload(self) -> bool:
        """Re-reads the config file; True when a new config was applied."""
        if self.config_path is None:
            return False
        self._digest = self._file_digest()
        try:
            config = load_config(self.config_path)
            auth = Authenticator(config.auth.to_auth_config())
        except (ConfigError, ValueError) as e:
            logger.error("config reload failed, keeping the running config: %s", e)
            self.forwarder.metrics.reloads.labels("error").inc()
            return False
        old = self.forwarder.config
        if config.listen != old.listen:
            logger.warning("listen address changes need a restart; keeping %s:%s", old.listen.host, old.listen.port)
        added, removed = self.forwarder.pool.apply(config)
        self.auth.current = auth
        self.forwarder.client.timeout = self.forwarder._timeout(config)
        logger.info("config reloaded: %d backends added %s, %d removed %s", len(added), added, len(removed), removed)
        self.forwarder.metrics.reloads.labels("ok").inc()
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            digest = self._file_digest()
            if digest is not None and digest != self._digest:
                self.reload()

    def health(self) -> tuple[bool, dict[str, Any]]:
        regions: dict[str, Any] = {}
        for name, members in self.pool.regions():
            regions[name] = {
                "up": any(b.eligible() for b in members),
                "backends": {b.url: {"up": b.eligible(), "probe": b.last_probe_status,
                                     "circuit": b.breaker.state.name.lower(), "outstanding": b.outstanding}
                             for b in members},
            }  # fmt: skip
        up = any(r["up"] for r in regions.values())
        detail: dict[str, Any] = {"status": "ok" if up else "unavailable", "regions": regions}
        for group in ("canary", "shadow"):
            members = self.pool.group(group)
            if members:
                detail[group] = {"backends": {b.url: {"up": b.eligible(), "probe": b.last_probe_status}
                                              for b in members}}  # fmt: skip
        if "canary" in detail:
            detail["canary"]["weight"] = self.pool.canary_weight
        return up, detail


def build_app(router: Router) -> FastAPI:
    fwd = router.forwarder

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await probe_all(fwd.client, fwd.pool)  # first round before traffic: loading servers get none
        tasks = [asyncio.create_task(probe_loop(fwd.client, fwd.pool)), asyncio.create_task(router.watch())]
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop.add_signal_handler(signal.SIGHUP, router.reload)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.remove_signal_handler(signal.SIGHUP)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await fwd.aclose()

    app = FastAPI(title="pagedserve router", version=pagedserve.__version__, lifespan=lifespan)
    app.state.router = router
    install_exception_handlers(app)
    app.add_middleware(AuthMiddleware, authenticator=router.auth)

    async def json_body(raw: Request) -> dict[str, Any]:
        try:
            body = json.loads(await raw.body())
        except ValueError as e:
            raise BadRequestError(f"Request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequestError("The request body must be a JSON object.")
        return body

    def tenant(raw: Request) -> str | None:
        return getattr(getattr(raw.state, "principal", None), "tenant", None)

    async def generation(route: str, raw: Request) -> Response:
        body = await json_body(raw)
        ctx = fwd.context(route, raw.url.path, raw.headers, tenant(raw), body)
        if body.get("stream") is True:
            return await fwd.stream(ctx, body)
        return await fwd.forward(ctx, "POST", body)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request) -> Response:
        return await generation("chat", raw)

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        return await generation("completions", raw)

    @app.post("/tokenize")
    @app.post("/detokenize")
    async def passthrough_post(raw: Request) -> Response:
        body = await json_body(raw)
        return await fwd.forward(fwd.context(raw.url.path, raw.url.path, raw.headers, tenant(raw), None), "POST", body)

    @app.get("/v1/models")
    async def models(raw: Request) -> Response:
        return await fwd.forward(fwd.context("models", "/v1/models", raw.headers, tenant(raw), None), "GET", None)

    @app.get("/health")
    async def health() -> JSONResponse:
        up, detail = router.health()
        return JSONResponse(detail, status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(fwd.metrics.render(fwd.pool), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": pagedserve.__version__})

    return app


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagedserve router", allow_abbrev=False,
                                description="Multi-region OpenAI-compatible router in front of pagedserve servers.")  # fmt: skip
    p.add_argument("--config", required=True, help="router.yaml (reloaded on SIGHUP or when the file changes)")
    p.add_argument("--host", default=None, help="overrides listen.host")
    p.add_argument("--port", type=int, default=None, help="overrides listen.port")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def router_main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        router = Router(config, args.config)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    uvicorn.run(build_app(router), host=host, port=port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(router_main(sys.argv[1:]))
