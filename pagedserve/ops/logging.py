"""Structured JSON logs with request context, an access log, and secret redaction.

One JSON object per line: {"ts", "level", "logger", "msg", "request_id"?, "tenant"?, ...extras,
"exc"?}. The request id and tenant come from context variables that the access-log middleware
sets for the life of a request (asyncio tasks inherit them), so every line logged while serving a
request carries its id without passing it around.

Never logged: prompt or output text (the access log has no body fields), and credentials: a filter
on our handler rewrites anything that looks like a bearer token, an API key or a JWT.
"""

from __future__ import annotations

import contextvars
import datetime
import json as _json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pagedserve_request_id", default=None
)
tenant_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("pagedserve_tenant", default=None)

ACCESS_LOGGER = "pagedserve.access"
REDACTED = "[REDACTED]"

# What a credential looks like in free text. Order matters: a JWT inside "Bearer ..." is handled
# by the first pattern.
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 " + REDACTED),  # 6+: not "bearer of"
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),  # bare JWT
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), REDACTED),  # OpenAI-style keys
    (
        re.compile(
            r"(?i)\b(api[_-]?key|x-api-key|authorization|token|secret|password)(\"?\s*[:=]\s*\"?)[^\s\",}&]+"
        ),
        r"\1\2" + REDACTED,
    ),
)

# LogRecord attributes that are not user extras.
_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def get_request_id() -> str | None:
    return request_id_var.get()


@contextmanager
def request_context(request_id: str | None, tenant: str | None = None) -> Iterator[None]:
    """Sets the request id (and tenant) for every log line emitted inside the block."""
    rid_token = request_id_var.set(request_id)
    tenant_token = tenant_var.set(tenant)
    try:
        yield
    finally:
        tenant_var.reset(tenant_token)
        request_id_var.reset(rid_token)


class RedactingFilter(logging.Filter):
    """Rewrites message, extras and traceback text of each record with `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid, tenant = request_id_var.get(), tenant_var.get()
        if rid is not None:
            out["request_id"] = rid
        if tenant is not None:
            out["tenant"] = tenant
        for key, value in vars(record).items():  # extras (they may override request_id / tenant)
            if key not in _STD_ATTRS and key not in ("ts", "level", "logger", "msg", "exc"):
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return _json.dumps(out, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = request_id_var.get()
        base = super().format(record)
        return f"{base} [request_id={rid}]" if rid else base


_OUR_HANDLER_ATTR = "_pagedserve_handler"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def configure_logging(
    level: int | str = "INFO", json: bool = True, stream: TextIO | None = None
) -> logging.Handler:
    """Install one handler on the root logger (idempotent: replaces the one installed before).

    uvicorn's loggers are routed to the root too, so their lines get the same format; the server
    should run uvicorn with access_log=False and use `AccessLogMiddleware` instead.
    """
    if isinstance(level, str):
        if level.upper() not in _LEVELS:
            raise ValueError(f"level must be one of {', '.join(_LEVELS)}, got {level!r}.")
        level = level.upper()
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _OUR_HANDLER_ATTR, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _OUR_HANDLER_ATTR, True)
    handler.setFormatter(
        JsonFormatter() if json else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    return handler


def log_access(
    method: str,
    path: str,
    status: int,
    latency_s: float,
    request_id: str | None,
    tenant: str | None,
    logger: logging.Logger | None = None,
    client_request_id: str | None = None,
) -> None:
    """One access-log line. The path is logged without its query string (it may hold secrets)."""
    (logger or logging.getLogger(ACCESS_LOGGER)).info(
        "%s %s %d",
        method,
        path.split("?", 1)[0],
        status,
        extra={
            "http_method": method,
            "path": path.split("?", 1)[0],
            "status": status,
            "latency_ms": round(latency_s * 1000.0, 3),
            "request_id": request_id,
            "client_request_id": client_request_id,
            "tenant": tenant,
        },
    )


_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class AccessLogMiddleware:
    """Pure-ASGI middleware: request ids in, X-Request-Id out, one access line per request.

    Every request gets a fresh internal id (uuid4 hex) in `scope["state"]["request_id"]`: it
    names the engine requests and the audit line, so it must be unique, and a client-chosen
    header is not (two concurrent requests sending the same X-Request-Id would collide in the
    engine). The client's X-Request-Id, when it is a sane token, is kept for correlation in
    `scope["state"]["client_request_id"]` (access log and audit field `client_request_id`) and
    echoed in the response; without one the response carries the internal id. Place it
    outermost (added last): the tenant is read from `scope["state"]["principal"]`, which the
    auth middleware inside it fills in.
    """

    def __init__(self, app: Any, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_rid = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                client_rid = candidate if _REQUEST_ID_RE.match(candidate) else None
                break
        rid = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["client_request_id"] = client_rid
        echoed = (client_rid or rid).encode()
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", echoed)]
            await send(message)

        with request_context(rid):
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                principal = state.get("principal")
                tenant = getattr(principal, "tenant", None)
                tenant_var.set(tenant)
                log_access(
                    scope.get("method", ""), scope.get("path", ""), status, time.perf_counter() - start, rid, tenant,
                    logger=self.logger, client_request_id=client_rid,
                )  # fmt: skip
