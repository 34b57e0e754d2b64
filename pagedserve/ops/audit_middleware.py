"""One audit line for every request to an audited route, exactly once.

    AccessLogMiddleware (request ids) -> AuditMiddleware -> ... -> AuthMiddleware -> route

Handlers of served requests write the detailed line themselves (tokens, payload hashes) and
claim the request first with `claim_audit(scope_state)`; when the request ends, this middleware
writes a short line for every request nobody claimed: rejections (401 from auth inside it, 400,
404, 413, 429, 503), routes that do not audit (/tokenize, /v1/models) and requests cut before
an outcome (status AuditLog.cut_status: "aborted", or "shutdown" after begin_shutdown()). The
claim flag lives in the per-request scope["state"] that both share, so whichever writes first
wins and the other skips: exactly one line per request.

It must sit outside every middleware that can reject a request, and inside the access-log
middleware that sets scope["state"]["request_id"] (the unique internal id).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect

from pagedserve.ops.audit import AuditLog, AuditLogClosedError, load_audit_key
from pagedserve.ops.auth import DEFAULT_PUBLIC_PATHS, route_path

# Audited by default, like auth's deny-by-default: every route path but the public probes, which
# a load balancer calls every second. "//v1/x", "/V1/x" or "/v1x" are attempts worth a line too.
UNAUDITED_PATHS: frozenset[str] = DEFAULT_PUBLIC_PATHS
_CLAIM = "pagedserve_audit_claimed"
logger = logging.getLogger("pagedserve.audit")


def claim_audit(state: MutableMapping[str, Any]) -> bool:
    """True the first time for one request: the caller then writes its one audit line."""
    if state.get(_CLAIM):
        return False
    state[_CLAIM] = True
    return True


def is_audited(path: str, unaudited: frozenset[str] = UNAUDITED_PATHS) -> bool:
    """`path` is the route path (root path already stripped: auth.route_path)."""
    return bool(path) and path not in unaudited


def outcome(http_status: int | None) -> str:
    if http_status is None:
        return "aborted"
    return "ok" if http_status < 400 else "rejected" if http_status < 500 else "error"


def audit_log_from_args(args: argparse.Namespace) -> AuditLog | None:
    """--audit-log FILE [--audit-key-file K | $PAGEDSERVE_AUDIT_KEY] [--audit-checkpoint-interval N]."""
    if not args.audit_log:
        if getattr(args, "audit_key_file", None):
            raise ValueError("--audit-key-file needs --audit-log FILE")
        return None
    key = load_audit_key(getattr(args, "audit_key_file", None))
    if key is None:
        logger.warning("audit log %s is UNKEYED: anyone able to write it can re-chain it; "
                       "give --audit-key-file or $PAGEDSERVE_AUDIT_KEY", args.audit_log)  # fmt: skip
    return AuditLog(args.audit_log, key=key, checkpoint_interval=getattr(args, "audit_checkpoint_interval", 1))


def write_line(log: AuditLog, **fields: Any) -> None:
    """record(), but a line lost because the log is already closed (a request finishing after
    shutdown closed it) is reported in the server log instead of failing the request."""
    try:
        log.record(**fields)
    except AuditLogClosedError as e:
        logger.error("audit line lost: %s", e)


class AuditMiddleware:
    """Pure ASGI (streamed responses are not buffered); `model` is the served model's name."""

    def __init__(self, app: Any, log: AuditLog, model: str | None = None,
                 unaudited: frozenset[str] = UNAUDITED_PATHS) -> None:  # fmt: skip
        self.app = app
        self.log = log
        self.model = model
        self.unaudited = unaudited

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if not is_audited(path, self.unaudited):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        arrival = time.time()
        http_status: int | None = None

        async def send_wrapper(message: Any) -> None:
            nonlocal http_status
            if message["type"] == "http.response.start":
                http_status = int(message["status"])
            await send(message)

        status: str | None = None
        try:
            await self.app(scope, receive, send_wrapper)
        except (asyncio.CancelledError, ClientDisconnect):
            status = self.log.cut_status
            raise
        except Exception:
            status = "error"
            http_status = http_status or 500  # the server-error middleware outside answers 500
            raise
        finally:
            if claim_audit(state):
                principal = state.get("principal")
                write_line(
                    self.log, request_id=state.get("request_id") or uuid.uuid4().hex,
                    client_request_id=state.get("client_request_id"), tenant=getattr(principal, "tenant", None),
                    key_id=getattr(principal, "key_id", None), model=self.model, arrival_time=arrival,
                    finish_time=time.time(), prompt_tokens=0, completion_tokens=0,
                    status=status or (outcome(http_status) if http_status else self.log.cut_status),
                    method=scope.get("method"), path=path, http_status=http_status,
                )  # fmt: skip
