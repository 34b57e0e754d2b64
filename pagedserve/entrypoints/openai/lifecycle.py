"""How the server stops: graceful drain on SIGTERM / SIGINT, and what a dead engine leads to.

    SIGTERM / SIGINT ──> draining: /health 503 {"status": "draining"}, new requests 503
                         in-flight requests run on, up to --shutdown-timeout seconds
                         the rest are cut: error event (streams) / 503 JSON, audited "shutdown"
                         ──> uvicorn stops, the engine shuts down, exit status 0
    second signal    ──> cut the in-flight requests now;  third signal: uvicorn's force exit

    engine process dies ──> its in-flight requests fail (AsyncLLM._on_dead: error event / 503)
        --restart-engine, restarts left   ──> /health 503 {"status": "restarting"} while a fresh
                                              engine core starts in place, then serve again
        otherwise                         ──> exit status 1, so a supervisor (Kubernetes,
                                              systemd) restarts the whole service

uvicorn's own signal handling is replaced (`DrainingServer.handle_exit`) because it stops
accepting and cancels streams after its fixed graceful timeout, silently, and re-raises SIGTERM
(so the process would die by the signal instead of exiting 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from pagedserve.entrypoints.openai.errors import ServerShutdownError

if TYPE_CHECKING:
    from pagedserve.engine.async_llm import AsyncLLM
    from pagedserve.entrypoints.openai.serving_engine import ServerState

logger = logging.getLogger("pagedserve.lifecycle")

EXIT_ENGINE_DEAD = 1
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
DEFAULT_ENGINE_RESTARTS = 3  # --restart-engine without --max-engine-restarts
POLL_S = 0.05
FLUSH_S = 5.0  # after requests were failed or cut: time for their last events and audit lines
RESTART_BACKOFF_S = 1.0


def engine_restarts(args: Any) -> int:
    """How many engine restarts the flags allow (0: exit when the engine dies)."""
    if not getattr(args, "restart_engine", False):
        return 0
    n = getattr(args, "max_engine_restarts", None)
    return DEFAULT_ENGINE_RESTARTS if n is None else int(n)


class ServerLifecycle:
    """Owns draining and engine-death handling for one server; everything runs on its event loop
    except `on_signal`, which only hands the signal over to the loop."""

    def __init__(self, state: ServerState, shutdown_timeout_s: float, max_engine_restarts: int) -> None:
        self.state = state
        self.shutdown_timeout_s = shutdown_timeout_s
        self.restarts_left = max_engine_restarts
        self.exit_code = 0
        self.draining = False
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._cut_now: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, server: uvicorn.Server) -> None:
        """Called on the event loop before `server.serve()`: the server this lifecycle stops."""
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._cut_now = asyncio.Event()

    def watch(self, engine: AsyncLLM) -> None:
        engine.dead_listeners.append(self._on_engine_dead)

    # ------------------------------------------------------------------ signals and drain

    def on_signal(self, sig: int) -> None:
        """Signal-handler context (main thread, between bytecodes): only schedule the work."""
        loop = self._loop
        if loop is None or loop.is_closed():
            if self._server is not None:
                self._server.should_exit = True
            return
        loop.call_soon_threadsafe(self._signalled, sig)

    def _signalled(self, sig: int) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            self._spawn(self._drain(name))
        elif self._signals == 2 and self._cut_now is not None:
            logger.warning("second %s: cutting the in-flight requests now", name)
            self._cut_now.set()
        elif self._server is not None:
            logger.warning("%s again: forcing exit", name)
            self._server.force_exit = True
            self._server.should_exit = True

    async def _drain(self, signal_name: str) -> None:
        self.draining = True
        self.state.lifecycle_status = "draining"
        engine = self.state.engine
        in_flight = engine.num_in_flight if engine is not None else 0
        logger.info(
            "%s: draining, no new requests", signal_name,
            extra={"in_flight": in_flight, "shutdown_timeout_s": self.shutdown_timeout_s},
        )  # fmt: skip
        if engine is not None and in_flight:
            if not await self._wait_idle(engine, self.shutdown_timeout_s, self._cut_now):
                cut = engine.fail_all(ServerShutdownError(
                    "The server shut down before the request finished "
                    f"(--shutdown-timeout {self.shutdown_timeout_s:g} s)."
                ))  # fmt: skip
                logger.warning("shutdown: cut the requests still running", extra={"requests": cut})
                await self._wait_idle(engine, FLUSH_S)
        logger.info("drained; stopping", extra={"exit_code": self.exit_code})
        self._stop()

    async def _wait_idle(
        self, engine: AsyncLLM, timeout_s: float, cancel: asyncio.Event | None = None
    ) -> bool:
        """True once the engine has no request in flight; False at the timeout or on `cancel`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while engine.num_in_flight:
            if loop.time() >= deadline or (cancel is not None and cancel.is_set()):
                return False
            await asyncio.sleep(POLL_S)
        return True

    # ------------------------------------------------------------------ engine death

    def _on_engine_dead(self, reason: str) -> None:
        """AsyncLLM dead listener (on the loop): the in-flight requests were already failed."""
        if self.draining or self.restarts_left <= 0:
            self._spawn(self._exit_dead(reason))
        else:
            self.state.lifecycle_status = "restarting"  # now, not when the task first runs
            self._spawn(self._restart(reason))

    def on_start_failed(self, reason: str) -> None:
        """The engine never came up (a bad model file, a pool that does not fit): exit non-zero
        rather than answer 503 forever, so that the supervisor sees the failure and reports it."""
        self.exit_code = EXIT_ENGINE_DEAD
        logger.error("the engine failed to start; the server exits", extra={
            "reason": reason, "exit_code": self.exit_code})  # fmt: skip
        self._stop()

    async def _exit_dead(self, reason: str) -> None:
        self.exit_code = EXIT_ENGINE_DEAD
        logger.error(
            "the engine died; the server exits so that its supervisor restarts it",
            extra={"reason": reason, "exit_code": self.exit_code},
        )  # fmt: skip
        engine = self.state.engine
        if engine is not None:
            await self._wait_idle(engine, FLUSH_S)  # the failed requests' error responses go out
        self._stop()

    async def _restart(self, reason: str) -> None:
        engine = self.state.engine
        assert engine is not None  # only a started engine can die
        try:
            while self.restarts_left > 0:
                self.restarts_left -= 1
                logger.warning("the engine died; restarting it", extra={
                    "reason": reason, "restarts_left": self.restarts_left})  # fmt: skip
                try:
                    ready = await engine.restart()
                except Exception as e:  # noqa: BLE001 - counted as one attempt, then retried
                    reason = f"restart failed: {e}"
                    logger.error("engine restart failed", extra={"reason": str(e)})
                    await asyncio.sleep(RESTART_BACKOFF_S)
                    continue
                logger.info("engine restarted", extra={"engine_pid": ready.pid})
                return
        finally:
            if self.state.lifecycle_status == "restarting":  # not if a drain began meanwhile
                self.state.lifecycle_status = None
        await self._exit_dead(f"no engine restarts left ({reason})")

    # ------------------------------------------------------------------ plumbing

    def _stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """At the end of the app's lifespan: stop a restart still under way (and its process)."""
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with SIGINT / SIGTERM handed to the lifecycle (drain, then stop)."""

    def __init__(self, config: uvicorn.Config, lifecycle: ServerLifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.lifecycle.on_signal(sig)
