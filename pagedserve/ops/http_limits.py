"""HTTP limits: the hardening flags, and the ASGI middleware for body size/time and concurrency.

    add_hardening_args     one argument group: every limit below, prompt bounds
                           (entrypoints/openai/prompt_bounds.py), the chat-template trust flag, CORS
    HTTPLimitsMiddleware   ASGI: 429 over --max-concurrent-requests, 413 over
                           --max-request-body-bytes (Content-Length first, then counted while the
                           body streams), 408 when the body is not in within --request-body-timeout

Connection-level limits (slow headers, --max-connections, open files, log floods) are in
conn_limits.py.

Why two concurrency limits: ASGI sees a request only once its headers are parsed, so the
middleware can answer with a proper 429 + OpenAI error JSON; connections that never finish a
request are invisible to it. uvicorn's limit_concurrency covers those with its bare 503, so it is
set above --max-concurrent-requests and only applies when the 429 path cannot.

Every error body is the OpenAI shape (errors.py); responses to a request whose body is left
unread say `Connection: close`, so the connection does not linger half-read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException

from pagedserve.entrypoints.openai.errors import OpenAIError, overloaded
from pagedserve.ops.auth import DEFAULT_PUBLIC_PATHS, route_path

DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONCURRENT = 2048
CONNECTION_HEADROOM = 1024  # default --max-connections = --max-concurrent-requests + this
_CLOSE = {"Connection": "close"}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


# ---------------------------------------------------------------------------- flags


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError('must be a JSON list of strings, e.g. \'["*"]\'')
    return value


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_hardening_args(parser: argparse.ArgumentParser) -> None:
    """One argument group: HTTP limits, prompt bounds, chat-template trust, CORS."""
    from pagedserve.entrypoints.openai import prompt_bounds as pb

    group = parser.add_argument_group("HTTP limits and hardening")

    def add(*names: str, **kwargs: Any) -> None:
        # Several of these are vLLM flags that another group may already define (the CORS ones,
        # the trust flag): argparse would refuse the duplicate, and the first definition wins.
        if not any(n in parser._option_string_actions for n in names):
            group.add_argument(*names, **kwargs)

    add("--max-request-body-bytes", type=_positive(int), default=DEFAULT_MAX_BODY_BYTES,
        help="413 for a larger request body (default 16 MiB)")  # fmt: skip
    add("--request-body-timeout", type=_positive(float), default=DEFAULT_BODY_TIMEOUT_S,
        help="408 when the body is not fully received this many seconds after the headers")
    add("--header-read-timeout", type=_positive(float), default=DEFAULT_HEADER_TIMEOUT_S,
        help="close a connection whose request headers are not complete in this many seconds")
    add("--timeout-keep-alive", type=_positive(int), default=5,
        help="close an idle keep-alive connection after this many seconds (uvicorn)")
    add("--h11-max-incomplete-event-size", type=_positive(int), default=64 << 10,
        help="bound in bytes on a request line + headers (uvicorn/h11)")
    add("--max-concurrent-requests", type=_positive(int), default=DEFAULT_MAX_CONCURRENT,
        help="429 beyond this many requests in flight (probes and /metrics exempt)")
    add("--max-connections", type=_positive(int), default=None,
        help="uvicorn's limit_concurrency: bare 503 beyond this many connections "
        f"(default: --max-concurrent-requests + {CONNECTION_HEADROOM})")  # fmt: skip
    add("--max-prompts-per-request", type=_positive(int), default=pb.DEFAULT_MAX_PROMPTS,
        help="400 when len(prompts) * n is larger")
    add("--max-prompt-chars", type=_positive(int), default=None,
        help="400 for a prompt text or rendered chat template longer than this "
        f"(default: {pb.CHARS_PER_TOKEN_BOUND} x max-model-len, at least 1 MiB)")
    add("--chat-template-timeout", type=_positive(float), default=pb.DEFAULT_RENDER_TIMEOUT_S,
        help="400 when rendering a chat template takes longer (seconds)")
    add("--trust-request-chat-template", action="store_true",
        help="accept a chat_template sent in a request (refused with 400 otherwise)")
    add("--allowed-origins", type=_json_list, default=["*"], help='CORS, JSON list (default ["*"])')
    add("--allowed-methods", type=_json_list, default=["*"], help="CORS, JSON list")
    add("--allowed-headers", type=_json_list, default=["*"], help="CORS, JSON list")
    add("--allow-credentials", action="store_true", help="CORS: allow credentials")


def cors_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for starlette's CORSMiddleware (vLLM's flags and defaults)."""
    return dict(allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
                allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials)  # fmt: skip


def max_connections(args: argparse.Namespace) -> int:
    return int(args.max_connections or args.max_concurrent_requests + CONNECTION_HEADROOM)


# ---------------------------------------------------------------------------- ASGI middleware


class RequestBodyTooLarge(HTTPException):
    """A starlette HTTPException so FastAPI's body reader re-raises it (its other errors become
    a generic 400) and the exception handler renders it as an OpenAI error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes (--max-request-body-bytes).",
                         headers=_CLOSE)  # fmt: skip


class RequestBodyTimeout(HTTPException):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"The request body was not received within {timeout_s:g} s "
                              "(--request-body-timeout).", headers=_CLOSE)  # fmt: skip


@dataclass(slots=True, frozen=True)
class HTTPLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None  # a bad value is h11's 400, not ours
    return None


def _error_response(exc: HTTPException) -> Any:
    return OpenAIError(str(exc.detail), status=exc.status_code, headers=exc.headers).to_response()


class HTTPLimitsMiddleware:
    """Pure ASGI (streams pass unbuffered). In-flight count is per process, on the event loop
    only, so a plain int is race-free. Liveness probes and /metrics are not counted or refused:
    a saturated server must still look alive to its orchestrator."""

    def __init__(self, app: Any, limits: HTTPLimits, exempt_paths: frozenset[str] = DEFAULT_PUBLIC_PATHS) -> None:
        self.app = app
        self.limits = limits
        self.exempt_paths = exempt_paths
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.limits
        exempt = route_path(scope) in self.exempt_paths
        if not exempt and self.in_flight >= limits.max_concurrent_requests:
            err = overloaded(f"Too many requests in flight (limit {limits.max_concurrent_requests}, "
                             "--max-concurrent-requests); retry later.", retry_after_s=1)  # fmt: skip
            err.headers.update(_CLOSE)
            await err.to_response()(scope, receive, send)  # type: ignore[arg-type]
            return
        length = _content_length(scope)
        if length is not None and length > limits.max_body_bytes:
            await _error_response(RequestBodyTooLarge(limits.max_body_bytes))(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.body_timeout_s
        received = 0
        body_done = False

        async def bounded_receive() -> Any:
            # Only the body is bounded; afterwards receive() is the disconnect watch of long
            # generations and must wait as long as the response takes.
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RequestBodyTimeout(limits.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limits.max_body_bytes:
                    raise RequestBodyTooLarge(limits.max_body_bytes)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        if not exempt:
            self.in_flight += 1
        try:
            await self.app(scope, bounded_receive, tracking_send)
        except (RequestBodyTooLarge, RequestBodyTimeout) as exc:  # read outside a route's handler
            if started:
                raise
            await _error_response(exc)(scope, receive, send)
        finally:
            if not exempt:
                self.in_flight -= 1
