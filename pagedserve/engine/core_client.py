"""Clients of the engine core, one interface (`EngineCoreClient`) over two placements:

    MPClient      the core in its own spawned process (the server): ZMQ + msgpack, engine_core_proc.py
    InprocClient  the core in this process (tests, in-process serving): steps in a worker thread

AsyncLLM talks to either through the Protocol only: add_request / abort (synchronous sends),
outputs and death reported through the `on_outputs` / `on_dead` callbacks, `fresh()` for a restart.
Messages: engine/messages.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from pagedserve.config import EngineConfig
from pagedserve.engine.driver import EngineDriver
from pagedserve.engine.engine_core_proc import GRAMMAR_POLL_MS, LogSettings, run_engine_core
from pagedserve.engine.messages import (
    AbortMsg,
    AddRequestMsg,
    EngineDeadError,
    ErrorMsg,
    InputMsg,
    OutputMsg,
    OutputsMsg,
    ReadyMsg,
    ShutdownMsg,
)

logger = logging.getLogger(__name__)

OutputHandler = Callable[[OutputsMsg], None]
DeadHandler = Callable[[str], None]


class EngineCoreClient(Protocol):
    """What AsyncLLM needs of an engine core, wherever it runs."""

    config: EngineConfig
    ready: ReadyMsg | None
    is_alive: bool
    dead_reason: str | None
    on_outputs: OutputHandler  # called on the event-loop thread, once per step report
    on_dead: DeadHandler  # called once, with the reason, when the core is gone

    @property
    def pid(self) -> int | None: ...  # the engine process, None in-process

    async def start(self, timeout_s: float = 600.0) -> ReadyMsg: ...

    def add_request(self, msg: AddRequestMsg) -> None: ...  # EngineDeadError when not alive

    def abort(self, child_ids: list[str]) -> None: ...

    def fresh(self) -> EngineCoreClient: ...  # a new, unstarted client of the same kind and config

    async def shutdown(self) -> None: ...


def make_client(config: EngineConfig, multiprocess: bool = True, log: LogSettings | None = None) -> EngineCoreClient:
    """log: the engine process's log settings (the in-process core logs as this process does)."""
    return MPClient(config, log=log) if multiprocess else InprocClient(config)


class MPClient:
    """Async client of an engine core in its own (spawned) process."""

    def __init__(self, config: EngineConfig, liveness_interval_s: float = 0.2, log: LogSettings | None = None) -> None:
        self.config = config
        self.liveness_interval_s = liveness_interval_s
        self.log = log
        self.ready: ReadyMsg | None = None
        self.is_alive = False
        self.dead_reason: str | None = None
        self.on_outputs: OutputHandler = lambda msg: None
        self.on_dead: DeadHandler = lambda reason: None
        self._tmpdir = tempfile.mkdtemp(prefix="pagedserve-ipc-")
        self._proc: Any = None
        self._ctx: Any = None
        self._in: Any = None
        self._out: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(OutputMsg)  # type: ignore[arg-type]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, timeout_s: float = 600.0) -> ReadyMsg:
        """Spawn the engine process and wait until it reports ready (or fails). Call it on a
        thread that outlives the client (the server's event-loop thread): the engine's parent-death
        signal fires when the spawning thread exits (engine/parent_watch.py)."""
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        input_addr = f"ipc://{self._tmpdir}/input"
        output_addr = f"ipc://{self._tmpdir}/output"
        self._in = self._ctx.socket(zmq.PUSH)
        self._in.bind(input_addr)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.bind(output_addr)
        mp = multiprocessing.get_context("spawn")
        self._proc = mp.Process(
            target=run_engine_core, args=(self.config, input_addr, output_addr, self.log),
            name="pagedserve-engine-core", daemon=True,
        )  # fmt: skip
        self._proc.start()
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._proc.is_alive():
                raise EngineDeadError(f"engine process exited during start-up (code {self._proc.exitcode})")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"engine did not become ready within {timeout_s:.0f} s")
            if await self._out.poll(200):
                msg = self._decoder.decode(await self._out.recv())
                if isinstance(msg, ErrorMsg):
                    raise EngineDeadError(msg.message)
                if isinstance(msg, ReadyMsg):
                    break
        self.ready = msg
        self.is_alive = True
        self._tasks = [
            asyncio.create_task(self._read_outputs(), name="engine-output-reader"),
            asyncio.create_task(self._watch(), name="engine-liveness"),
        ]
        return msg

    def fresh(self) -> MPClient:
        return MPClient(self.config, self.liveness_interval_s, self.log)

    def add_request(self, msg: AddRequestMsg) -> None:
        self._check_alive()
        self._in.send(self._encoder.encode(msg))

    def abort(self, child_ids: list[str]) -> None:
        if child_ids and self.is_alive:
            self._in.send(self._encoder.encode(AbortMsg(list(child_ids))))

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "the engine is not running")

    def _mark_dead(self, reason: str) -> None:
        if self.is_alive or self.dead_reason is None:
            self.is_alive = False
            self.dead_reason = reason
            logger.error("engine core is dead: %s", reason)
            self.on_dead(reason)

    async def _read_outputs(self) -> None:
        while True:
            raw = await self._out.recv()
            msg = self._decoder.decode(raw)
            if isinstance(msg, OutputsMsg):
                try:
                    self.on_outputs(msg)
                except Exception:  # noqa: BLE001 - one bad output must not kill the reader
                    logger.exception("failed to process engine outputs")
            elif isinstance(msg, ErrorMsg):
                self._mark_dead(msg.message)

    async def _watch(self) -> None:
        while self._proc.is_alive():
            await asyncio.sleep(self.liveness_interval_s)
        self._mark_dead(f"engine process exited (code {self._proc.exitcode})")

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._proc is not None and self._proc.is_alive():
            try:
                self._in.send(self._encoder.encode(ShutdownMsg()))
            except Exception:  # noqa: BLE001
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self.is_alive = False
        if self._ctx is not None:  # None after a first shutdown (a restart shuts a dead client down)
            self._ctx.destroy(linger=0)
            self._ctx = None
        shutil.rmtree(self._tmpdir, ignore_errors=True)


class InprocClient:
    """The same interface over an in-process EngineCore; steps run in a worker thread, inputs are
    applied between steps by the driver task (so the core is only ever touched by one thread)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.ready: ReadyMsg | None = None
        self.is_alive = False
        self.dead_reason: str | None = None
        self.on_outputs: OutputHandler = lambda msg: None
        self.on_dead: DeadHandler = lambda reason: None
        self.core: Any = None
        self._pending: list[InputMsg] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None

    async def start(self, timeout_s: float = 600.0) -> ReadyMsg:
        from pagedserve.engine.engine_core import EngineCore

        self.core = await asyncio.to_thread(EngineCore, self.config)
        cache = self.config.cache_config
        self.ready = ReadyMsg(
            pid=os.getpid(), num_gpu_blocks=cache.num_gpu_blocks, num_cpu_blocks=cache.num_cpu_blocks,
            block_size=cache.block_size, kv_capacity_tokens=self.core.kv_capacity_tokens,
            vocab_size=self.core.vocab_size, startup_seconds=self.core.stats.startup_seconds,
        )  # fmt: skip
        self.is_alive = True
        self._task = asyncio.create_task(self._drive(), name="inproc-engine")
        return self.ready

    def fresh(self) -> InprocClient:
        return InprocClient(self.config)

    def add_request(self, msg: AddRequestMsg) -> None:
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "the engine is not running")
        self._pending.append(msg)
        self._wake.set()

    def abort(self, child_ids: list[str]) -> None:
        if child_ids:
            self._pending.append(AbortMsg(list(child_ids)))
            self._wake.set()

    async def _drive(self) -> None:
        driver = EngineDriver(self.core)
        try:
            while True:
                if not self._pending and not driver.has_work():
                    self._wake.clear()
                    if self.core.has_unfinished_requests():  # only grammars pending: look again soon
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), GRAMMAR_POLL_MS / 1000)
                    else:
                        await self._wake.wait()
                pending, self._pending = self._pending, []
                driver.apply(pending)
                report = await asyncio.to_thread(driver.step, bool(pending))
                if report is not None:
                    self.on_outputs(report)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            logger.exception("in-process engine core failed")
            self.is_alive = False
            self.dead_reason = f"engine core failed: {e}"
            self.on_dead(self.dead_reason)

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.core is not None:
            self.core.shutdown()
        self.is_alive = False
