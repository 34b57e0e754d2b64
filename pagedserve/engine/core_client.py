"""Clients of the engine core: in-process (tests, offline) and in its own process (the server).

    HTTP process (asyncio)                         engine-core process (spawned)
    ─────────────────────                          ──────────────────────────────
    MPClient.add_request ──PUSH  ipc://…/input ──> PULL  ─┐
    MPClient.abort       ──┘                              ├─ loop: drain inputs; step() while work
    output reader task  <──PULL  ipc://…/output <── PUSH ─┘        send OutputsMsg per step
    liveness watch: the process died -> every in-flight request fails, is_alive = False

Messages are msgspec (msgpack) structs; requests travel as plain fields (ids, token ids,
typed SamplingParams), outputs as the `EngineCoreOutput` dataclasses of core/outputs.py.
The HTTP process binds both sockets, so a dead engine never blocks a send: ZMQ queues it.

A user request with n samples is one `AddRequestMsg` holding n children ("<i>_<id>"): the engine
side links them as leader + followers exactly as `LLMEngine.add_request` does (`link_children`).
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
import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import EngineCoreOutput, SchedulerOutput
from pagedserve.core.request import Request
from pagedserve.core.scheduler import SchedulerStats
from pagedserve.engine.request_builder import link_children
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
# Set by the server before it spawns the engine process (which inherits the environment).
ENV_LOG_LEVEL, ENV_LOG_JSON = "PAGEDSERVE_ENGINE_LOG_LEVEL", "PAGEDSERVE_ENGINE_LOG_JSON"
# How often an engine with nothing to step but grammars being prepared looks for them.
_GRAMMAR_POLL_MS = 5

# ---------------------------------------------------------------------------- messages


class ChildSpec(msgspec.Struct):
    request_id: str
    sampling_params: SamplingParams  # msgspec encodes and decodes the dataclass itself


class AddRequestMsg(msgspec.Struct, tag="add"):
    """One user request: its children share the prompt; children[0] leads when it can fork."""

    children: list[ChildSpec]
    prompt_token_ids: list[int]
    eos_token_id: int | None
    arrival_time: float  # time.monotonic(): CLOCK_MONOTONIC is system-wide on Linux
    priority: int = 0
    priority_class: str = "interactive"  # or "batch"
    # the children's structured output grammar, compiled and serialized by the front end (the
    # engine deserializes it off its step loop instead of compiling again): structured_output.py
    grammar: str | None = None
    cache_salt: str | None = None  # vLLM's cache_salt: enters the first block's prefix-cache hash


class AbortMsg(msgspec.Struct, tag="abort"):
    request_ids: list[str]  # child ids


class ShutdownMsg(msgspec.Struct, tag="shutdown"):
    pass


class ReadyMsg(msgspec.Struct, tag="ready"):
    pid: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    block_size: int
    kv_capacity_tokens: int
    vocab_size: int
    startup_seconds: float


class ErrorMsg(msgspec.Struct, tag="error"):
    message: str
    fatal: bool = True


class OutputsMsg(msgspec.Struct, tag="outputs"):
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats | None  # the step's scheduler snapshot (also sent alone when idle)


InputMsg = AddRequestMsg | AbortMsg | ShutdownMsg
OutputMsg = ReadyMsg | ErrorMsg | OutputsMsg


class EngineDeadError(RuntimeError):
    """The engine core process is gone: requests cannot make progress."""


# ---------------------------------------------------------------------------- request building


def requests_from_msg(msg: AddRequestMsg) -> list[Request]:
    children = [
        Request(
            request_id=c.request_id,
            prompt_token_ids=list(msg.prompt_token_ids),
            sampling_params=c.sampling_params,
            eos_token_id=msg.eos_token_id,
            arrival_time=msg.arrival_time,
            priority=msg.priority,
            cache_salt=msg.cache_salt,
            priority_class=msg.priority_class,
        )
        for c in msg.children
    ]
    return link_children(children)


def idle_stats(core: Any) -> SchedulerStats:
    """The scheduler's state without running a step (after aborts drained the batch)."""
    empty = SchedulerOutput([], [], {}, 0, set())
    stats: SchedulerStats = core.scheduler.make_stats(empty, (0, 0))  # no step: no slots in use
    return stats


# ---------------------------------------------------------------------------- engine process


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Entry point of the engine-core process (multiprocessing spawn target)."""
    import zmq

    from pagedserve.engine.engine_core import EngineCore
    from pagedserve.engine.parent_watch import guard_parent, parent_is_alive
    from pagedserve.worker.cpu_resources import configure_engine_threads

    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None and parent.pid is not None else os.getppid()
    guard_parent(parent_pid)  # never outlive the server (prctl death signal + watchdog thread)
    if os.environ.get(ENV_LOG_LEVEL):  # the server's log format, for this process's lines too
        from pagedserve.ops.logging import configure_logging

        configure_logging(os.environ[ENV_LOG_LEVEL], json=os.environ.get(ENV_LOG_JSON, "1") == "1")
    configure_engine_threads(config.device, config.cpu_threads)
    ctx = zmq.Context()
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.connect(output_addr)
    in_sock = ctx.socket(zmq.PULL)
    in_sock.connect(input_addr)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(InputMsg)  # type: ignore[arg-type]
    try:
        core = EngineCore(config)
    except Exception as e:  # noqa: BLE001 - reported to the HTTP process, which fails start-up
        out_sock.send(encoder.encode(ErrorMsg(f"engine start-up failed: {e}\n{traceback.format_exc()}")))
        out_sock.close(linger=2000)
        ctx.term()
        return
    cache = config.cache_config
    out_sock.send(encoder.encode(ReadyMsg(
        pid=os.getpid(), num_gpu_blocks=cache.num_gpu_blocks, num_cpu_blocks=cache.num_cpu_blocks,
        block_size=cache.block_size, kv_capacity_tokens=core.kv_capacity_tokens,
        vocab_size=core.vocab_size, startup_seconds=core.stats.startup_seconds,
    )))  # fmt: skip
    poller = zmq.Poller()
    poller.register(in_sock, zmq.POLLIN)
    try:
        while True:
            busy = core.admit_ready()
            # Block for input only when idle; the timeout lets an orphan notice its parent died.
            # While only grammars are being prepared, poll briefly for them instead of stepping.
            events = dict(poller.poll(0 if busy else (_GRAMMAR_POLL_MS if core.has_unfinished_requests() else 1000)))
            had_input = False
            while events:
                try:
                    raw = in_sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                had_input = True
                msg = decoder.decode(raw)
                if isinstance(msg, ShutdownMsg):
                    return
                if isinstance(msg, AddRequestMsg):
                    for request in requests_from_msg(msg):
                        core.add_request(request, msg.grammar)
                else:
                    core.abort_requests(msg.request_ids)
            if core.admit_ready():
                outputs = core.step()
                out_sock.send(encoder.encode(OutputsMsg(outputs, core.stats.last)))
            elif had_input or busy:  # went idle: report the freed KV cache
                out_sock.send(encoder.encode(OutputsMsg([], idle_stats(core))))
            if not parent_is_alive(parent_pid):  # every step: an orphan stops computing at once
                return
            core.check_health()  # a dead tensor-parallel rank fails the engine even when idle
    except Exception as e:  # noqa: BLE001 - a bug in a step: tell the HTTP process, then die
        logger.exception("engine core failed")
        out_sock.send(encoder.encode(ErrorMsg(f"engine core failed: {e}")))
    finally:
        core.shutdown()  # the tensor-parallel workers, if any
        in_sock.close(linger=0)
        out_sock.close(linger=1000)
        ctx.term()


# ---------------------------------------------------------------------------- clients

OutputHandler = Callable[[OutputsMsg], None]
DeadHandler = Callable[[str], None]


class MPClient:
    """Async client of an engine core in its own (spawned) process."""

    def __init__(self, config: EngineConfig, liveness_interval_s: float = 0.2) -> None:
        self.config = config
        self.liveness_interval_s = liveness_interval_s
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
            target=run_engine_core, args=(self.config, input_addr, output_addr),
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
        core = self.core
        try:
            while True:
                if not self._pending and not core.admit_ready():
                    self._wake.clear()
                    if core.has_unfinished_requests():  # only grammars pending: look again soon
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), _GRAMMAR_POLL_MS / 1000)
                    else:
                        await self._wake.wait()
                had_input = bool(self._pending)
                pending, self._pending = self._pending, []
                for msg in pending:
                    if isinstance(msg, AddRequestMsg):
                        for request in requests_from_msg(msg):
                            core.add_request(request, msg.grammar)
                    elif isinstance(msg, AbortMsg):
                        core.abort_requests(msg.request_ids)
                if core.admit_ready():
                    outputs = await asyncio.to_thread(core.step)
                    self.on_outputs(OutputsMsg(outputs, core.stats.last))
                elif had_input:
                    self.on_outputs(OutputsMsg([], idle_stats(core)))
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


EngineCoreClient = MPClient | InprocClient
