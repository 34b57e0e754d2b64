"""Connection-level limits: what happens before (or outside) ASGI.

    header_timeout_protocol  uvicorn protocol subclass: a connection whose request line + headers
                           are not complete --header-read-timeout after it opened (or after its
                           last response) is closed: slow-header ("slowloris") clients cannot pin
                           connections, which ASGI never sees
    uvicorn_limit_kwargs   timeout_keep_alive, h11_max_incomplete_event_size (header size bound),
                           limit_concurrency (--max-connections, the last-resort backstop)
    raise_nofile_limit     soft RLIMIT_NOFILE -> hard limit at start (as vLLM does)
    RepeatFilter           collapses repeats of one warning/error to a few per second, with a
                           count of what was suppressed ("accept failed: too many open files")
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

from pagedserve.ops.http_limits import max_connections

logger = logging.getLogger(__name__)

NOFILE_RESERVE = 256  # fds kept for the engine IPC, logs, model files when capping connections


# ---------------------------------------------------------------------------- uvicorn level


def header_timeout_protocol(base: type[Any], timeout_s: float, max_connections: int | None = None) -> type[Any]:
    """`base` (uvicorn's H11Protocol or HttpToolsProtocol) closing connections whose next request
    head does not arrive within timeout_s (within 1 s for connections opened beyond
    max_connections: uvicorn answers those 503 if they do send a request, and idle ones must give
    their file descriptor back fast).

    Both uvicorn protocols make a new `self.cycle` when a request's headers are parsed. The timer
    is armed when the connection opens and when a response completes (before uvicorn may start a
    pipelined request); when it fires, an unchanged `cycle` means no request head arrived since,
    so nothing is in flight and closing is safe. Data trickling in does not re-arm it (unlike
    uvicorn's keep-alive timer, which any byte cancels).
    """

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            armed_cycle = self.cycle
            over = max_connections is not None and len(self.connections) > max_connections
            delay = min(timeout_s, 1.0) if over else timeout_s
            self._head_timer = self.loop.call_later(delay, self._head_timeout, armed_cycle)

        def _head_timeout(self, armed_cycle: Any) -> None:
            self._head_timer = None
            if self.cycle is armed_cycle and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm_head_timer()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    HeaderTimeoutProtocol.__name__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


def uvicorn_limit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for uvicorn.Config from the flags above. Call after raise_nofile_limit:
    --max-connections is held under the open-file limit, so sockets run out before files do."""
    # h11 whatever else is installed: uvicorn's "auto" takes httptools when present, which does
    # not apply h11_max_incomplete_event_size (the header size bound would silently go)
    from uvicorn.protocols.http.h11_impl import H11Protocol

    limit = max_connections(args)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and limit > soft - NOFILE_RESERVE:
        capped = max(1, soft - NOFILE_RESERVE)
        logger.warning("--max-connections %d is above the open-file limit %d; using %d", limit, soft, capped)
        limit = capped
    return dict(
        timeout_keep_alive=args.timeout_keep_alive,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        limit_concurrency=limit,
        http=header_timeout_protocol(H11Protocol, args.header_read_timeout, limit),
    )


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (vLLM does the same): with the default soft 1024,
    a busy server runs out of sockets long before it runs out of anything else. Returns the
    (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux refuses "infinity" here
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        logger.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
        return soft, hard
    return target, hard


# ---------------------------------------------------------------------------- log floods


class RepeatFilter(logging.Filter):
    """Lets through at most `burst` records per `period_s` for each distinct warning/error (same
    logger, level and first message line); the first one let through after a suppression says
    how many were dropped. Records below `min_level` (access lines, info) always pass.

    Why: at the file-descriptor limit every accept fails and each failure logs, which buried a
    server's logs under 77,823 lines in 10 s (and spent its CPU writing them).
    """

    def __init__(self, burst: int = 3, period_s: float = 1.0, min_level: int = logging.WARNING,
                 max_keys: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        super().__init__()
        self.burst, self.period_s, self.min_level, self.max_keys = burst, period_s, min_level, max_keys
        self._clock = clock
        self._lock = threading.Lock()  # handlers filter outside their own lock
        self._windows: dict[tuple[str, int, str], list[float]] = {}  # key -> [start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        first_line = record.getMessage().split("\n", 1)[0][:200]
        key = (record.name, record.levelno, first_line)
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.period_s:
                dropped = int(window[2]) if window is not None else 0
                if window is None and len(self._windows) >= self.max_keys:
                    self._windows.clear()  # many distinct messages: forget, never grow unbounded
                self._windows[key] = [now, 1.0, 0.0]
                if dropped:
                    record.msg = f"{record.getMessage()} [{dropped} similar messages suppressed]"
                    record.args = None
                return True
            if window[1] < self.burst:
                window[1] += 1
                return True
            window[2] += 1
            return False
