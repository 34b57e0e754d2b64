"""Forwarding: one client request -> attempts on backends until one answers, within a deadline.

Attempt outcomes (the same for streamed and non-streamed requests before their first byte):

    connect refused                     backend marked down at once + breaker failure -> next backend
    timeout / broken connection / 5xx   breaker failure (a 503 also marks it down)    -> next backend
    429                                 no breaker failure                            -> next backend
    2xx / other 4xx                     breaker success; the answer goes to the client as is

The next backend is the best untried one (pool.py order: same region first, then the next
region). When every backend was tried, the tried set is forgotten and the router waits briefly for
probes to bring one back, until `retry_deadline_s`. A non-streamed request shows the client nothing
until it is answered, so it is retried whatever happened. A stream that breaks after its first
byte is resumed (resume.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedserve.entrypoints.openai.errors import OpenAIError
from pagedserve.router.backends import Backend
from pagedserve.router.config import RouterConfig
from pagedserve.router.metrics import RouterMetrics
from pagedserve.router.pool import Choice, Pool, prefix_key
from pagedserve.router.release import CanaryGuard, compare_shadow, response_texts
from pagedserve.router.resume import (
    SSE_DONE,
    Detokenize,
    Route,
    StreamState,
    UpstreamError,
    resumable,
    settle,
)

logger = logging.getLogger(__name__)
WAIT_STEP_S = 0.05  # poll period while no backend is eligible
# Headers the router sets itself or that must not be forwarded hop to hop.
_DROP_HEADERS = {"host", "content-length", "authorization", "connection", "accept-encoding",
                 "transfer-encoding", "keep-alive", "te", "upgrade"}  # fmt: skip


def no_backend(message: str = "No backend is available to serve the request; retry shortly.") -> JSONResponse:
    return OpenAIError(message, status=503, type="service_unavailable_error",
                       headers={"Retry-After": "1"}).to_response()  # fmt: skip


@dataclass(slots=True)
class RequestContext:
    route: str  # "chat", "completions" or a passthrough path
    path: str  # upstream path, e.g. /v1/chat/completions
    headers: dict[str, str]  # client headers to forward (filtered)
    authorization: str | None
    tenant: str | None
    affinity: tuple[str, str] | None  # (kind, key)
    canary: bool
    deadline: float


class Forwarder:
    def __init__(self, config: RouterConfig, metrics: RouterMetrics | None = None) -> None:
        self.pool = Pool(config)
        self.metrics = metrics or RouterMetrics()
        self.canary = CanaryGuard()
        self.client = httpx.AsyncClient(timeout=self._timeout(config),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))  # fmt: skip
        self.background: set[asyncio.Task[Any]] = set()

    @property
    def config(self) -> RouterConfig:
        return self.pool.config

    @staticmethod
    def _timeout(config: RouterConfig) -> httpx.Timeout:
        return httpx.Timeout(connect=config.connect_timeout_s, read=config.read_timeout_s,
                             write=config.read_timeout_s, pool=config.connect_timeout_s)  # fmt: skip

    async def aclose(self) -> None:
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.client.aclose()

    def context(self, route: str, path: str, headers: Mapping[str, str], tenant: str | None,
                body: dict[str, Any] | None) -> RequestContext:  # fmt: skip
        cfg = self.config
        forward = {k: v for k, v in headers.items() if k.lower() not in _DROP_HEADERS}
        affinity = None
        session = headers.get(cfg.affinity.session_header) if cfg.affinity.session_header else None
        if session:
            affinity = ("session", session)
        elif cfg.affinity.prefix and body is not None:
            key = prefix_key(body, cfg.affinity.prefix_chars)
            affinity = ("prefix", key) if key else None
        canary = route in ("chat", "completions") and self.pool.take_canary_turn()
        return RequestContext(route, path, forward, headers.get("authorization"), tenant, affinity, canary,
                              time.monotonic() + cfg.retry_deadline_s)  # fmt: skip

    # Backend choice --------------------------------------------------------------------------

    async def acquire(self, ctx: RequestContext, tried: set[Backend]) -> Backend | None:
        """The next backend for this request (outstanding already counted), or None at the deadline."""
        while True:
            choice = self.pool.choose(tried, ctx.tenant, ctx.affinity[1] if ctx.affinity else None, ctx.canary)
            if choice is None and tried:
                tried.clear()  # everything was tried: start over with whatever is eligible now
                choice = self.pool.choose(tried, ctx.tenant, ctx.affinity[1] if ctx.affinity else None, ctx.canary)
            if choice is not None:
                return self._dispatch(ctx, choice, tried)
            if time.monotonic() >= ctx.deadline:
                return None
            await asyncio.sleep(WAIT_STEP_S)

    def _dispatch(self, ctx: RequestContext, choice: Choice, tried: set[Backend]) -> Backend:
        b = choice.backend
        if choice.affinity is not None and ctx.affinity is not None and not tried:
            self.metrics.affinity.labels(ctx.affinity[0], choice.affinity).inc()
        tried.add(b)
        b.breaker.on_dispatch()
        b.outstanding += 1
        return b

    def release(self, b: Backend) -> None:
        b.outstanding -= 1

    def headers_for(self, ctx: RequestContext, b: Backend) -> dict[str, str]:
        h = dict(ctx.headers)
        auth = f"Bearer {b.api_key}" if b.api_key else ctx.authorization
        if auth:
            h["authorization"] = auth
        return h

    def outcome(self, ctx: RequestContext, b: Backend, status: int | None, started: float,
                error: BaseException | None = None) -> bool:  # fmt: skip
        """Books one attempt (metrics, breaker, canary); True when the answer may go to the client."""
        label = str(status) if status is not None else type(error).__name__ if error else "error"
        self.metrics.requests.labels(b.region, b.url, ctx.route, label).inc()
        failed = status is None or status >= 500
        if b.group == "canary":
            self.canary.record(self.pool, self.metrics, not failed, time.monotonic() - started)
        if failed:
            refused = isinstance(error, httpx.ConnectError) or status == 503
            if b.on_failure(definitive=refused):
                logger.warning("circuit opened for %s (%s)", b.url, label)
            return False
        b.on_success()
        return status != 429

    def note_retry(self, ctx: RequestContext, reason: str, prev: Backend, nxt: Backend | None) -> None:
        self.metrics.retries.labels(reason).inc()
        if nxt is not None and nxt.region != prev.region:
            self.metrics.failovers.labels(prev.region, nxt.region).inc()

    # Non-streamed ----------------------------------------------------------------------------

    async def forward(self, ctx: RequestContext, method: str, body: dict[str, Any] | None) -> Response:
        tried: set[Backend] = set()
        last: Response | None = None
        start = time.monotonic()
        prev: Backend | None = None
        for _ in range(self.config.max_attempts):
            b = await self.acquire(ctx, tried)
            if b is None:
                break
            if prev is not None:
                self.note_retry(ctx, "error", prev, b)
            prev, t0 = b, time.monotonic()
            try:
                resp = await self.client.request(method, b.url + ctx.path, json=body, headers=self.headers_for(ctx, b))
            except httpx.HTTPError as e:
                self.outcome(ctx, b, None, t0, e)
                continue
            finally:
                self.release(b)
            headers = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
            answer = Response(resp.content, resp.status_code, media_type=resp.headers.get("content-type"),
                              headers={**headers, **served_by(b)})  # fmt: skip
            if self.outcome(ctx, b, resp.status_code, t0):
                self.metrics.duration.labels(ctx.route).observe(time.monotonic() - start)
                if resp.status_code == 200 and body is not None and ctx.route in ("chat", "completions"):
                    self.maybe_shadow(ctx, body, resp, time.monotonic() - t0)
                return answer
            last = answer
        return last if last is not None else no_backend()

    # Streamed --------------------------------------------------------------------------------

    async def open_stream(self, ctx: RequestContext, state: StreamState, tried: set[Backend],
                          prev: Backend | None) -> tuple[Backend, httpx.Response] | Response:  # fmt: skip
        """Attempts until a backend answers 200 with a stream; a client error is returned as is."""
        last: Response | None = None
        for _ in range(self.config.max_attempts):
            b = await self.acquire(ctx, tried)
            if b is None:
                break
            if prev is not None:
                self.note_retry(ctx, "resume" if state.has_progress else "error", prev, b)
            prev, t0 = b, time.monotonic()
            if state.has_progress and state.token_exact():
                await settle(state, self.detokenizer(ctx, b, state.body.get("model")))
            path, body = state.next_request(ctx.path)
            try:
                request = self.client.build_request("POST", b.url + path, json=body, headers=self.headers_for(ctx, b))
                resp = await self.client.send(request, stream=True)
            except httpx.HTTPError as e:
                self.release(b)
                self.outcome(ctx, b, None, t0, e)
                continue
            if resp.status_code == 200:
                return b, resp
            content = await resp.aread()
            await resp.aclose()
            self.release(b)
            answer = Response(content, resp.status_code, media_type=resp.headers.get("content-type"))
            if self.outcome(ctx, b, resp.status_code, t0):
                return answer
            last = answer
        return last if last is not None else no_backend()

    def detokenizer(self, ctx: RequestContext, b: Backend, model: Any) -> Detokenize:
        """ids -> text through the backend's /detokenize (None when it has none or fails)."""

        async def detokenize(ids: list[int]) -> str | None:
            payload = {"tokens": ids, **({"model": model} if isinstance(model, str) else {})}
            try:
                resp = await self.client.post(b.url + "/detokenize", json=payload, headers=self.headers_for(ctx, b))
                text = resp.json().get("prompt") if resp.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                return None
            return text if isinstance(text, str) else None

        return detokenize

    async def stream(self, ctx: RequestContext, body: dict[str, Any]) -> Response:
        route: Route = "chat" if ctx.route == "chat" else "completions"
        state = StreamState(route, body)
        tried: set[Backend] = set()
        opened = await self.open_stream(ctx, state, tried, None)
        if isinstance(opened, Response):
            return opened
        return StreamingResponse(self._pump(ctx, state, tried, *opened), media_type="text/event-stream",
                                 headers=served_by(opened[0]))  # the first backend; a resume may move on

    async def _pump(self, ctx: RequestContext, state: StreamState, tried: set[Backend],
                    b: Backend, resp: httpx.Response) -> AsyncIterator[str]:  # fmt: skip
        start = t0 = time.monotonic()
        can_resume = resumable(state.route, state.body)
        while True:
            error: BaseException | None = None
            try:
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    event = state.rewrite(json.loads(payload))
                    if event is not None:
                        yield event
                if not done:
                    raise UpstreamError("the stream ended without [DONE]")
            except (httpx.HTTPError, UpstreamError, json.JSONDecodeError) as e:
                error = e
            finally:
                await resp.aclose()
                self.release(b)
            if error is None:
                self.outcome(ctx, b, 200, t0)
                break
            self.outcome(ctx, b, None, t0, error)
            logger.warning("stream from %s broke (%s: %s)", b.url, type(error).__name__, error)
            if state.finished or state.client_error:
                break
            remaining = state.remaining_tokens()
            if remaining is not None and remaining <= 0 and state.has_progress:
                yield state.length_finish()
                break
            if state.has_progress and not can_resume:
                self.metrics.broken.labels(ctx.route).inc()
                yield _error_event("The backend failed mid-stream and the stream could not be resumed.")
                yield SSE_DONE
                return
            # A long stream may break long after it started: the deadline counts from the break.
            ctx.deadline = time.monotonic() + self.config.retry_deadline_s
            resumed = state.has_progress
            if resumed:
                logger.info("resuming a %s stream after %d tokens", ctx.route, state.sent_tokens)
            opened = await self.open_stream(ctx, state, tried, b)
            if isinstance(opened, Response):
                self.metrics.broken.labels(ctx.route).inc()
                yield _error_event("The backend failed mid-stream and no other backend could resume it.")
                yield SSE_DONE
                return
            if resumed:
                self.metrics.resumed.labels(ctx.route).inc()
            (b, resp), t0 = opened, time.monotonic()
        final = state.final_usage()
        if final is not None:
            yield final
        yield SSE_DONE
        self.metrics.duration.labels(ctx.route).observe(time.monotonic() - start)
        if not state.client_error:
            self.maybe_shadow(ctx, state.body, {0: state.text}, time.monotonic() - start)

    # Shadow ----------------------------------------------------------------------------------

    def maybe_shadow(self, ctx: RequestContext, body: dict[str, Any], primary: httpx.Response | dict[int, str],
                     latency_s: float) -> None:  # fmt: skip
        if not self.pool.group("shadow") or not self.pool.take_shadow_turn():
            return
        if isinstance(primary, httpx.Response):
            try:
                texts = response_texts(ctx.route, primary.json())
            except ValueError:
                return
        else:
            texts = primary
        task = asyncio.create_task(self._shadow(ctx, body, texts, latency_s))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _shadow(self, ctx: RequestContext, body: dict[str, Any], primary: dict[int, str],
                      primary_latency_s: float) -> None:  # fmt: skip
        ready = [b for b in self.pool.group("shadow") if b.eligible()]
        mirrored = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        shadow_texts: dict[int, str] | None = None
        t0 = time.monotonic()
        if ready:
            b = min(ready, key=Backend.load)
            b.outstanding += 1
            try:
                resp = await self.client.post(b.url + ctx.path, json=mirrored, headers=self.headers_for(ctx, b))
                self.metrics.requests.labels(b.region, b.url, ctx.route, str(resp.status_code)).inc()
                if resp.status_code == 200:
                    shadow_texts = response_texts(ctx.route, resp.json())
            except (httpx.HTTPError, ValueError) as e:
                logger.info("shadow request to %s failed: %s", b.url, e)
            finally:
                b.outstanding -= 1
        compare_shadow(self.metrics, body, primary, shadow_texts, primary_latency_s, time.monotonic() - t0)


def served_by(b: Backend) -> dict[str, str]:
    """Response headers naming the backend that answered (for debugging and the benchmark)."""
    return {"x-pagedserve-region": b.region, "x-pagedserve-backend": b.url}


def _error_event(message: str) -> str:
    err = OpenAIError(message, status=503, type="service_unavailable_error")
    return f"data: {json.dumps(err.to_json())}\n\n"
