"""The engine-core process: its entry point and loop (the server's engine runs here).

    HTTP process (asyncio)                         engine-core process (spawned)
    ─────────────────────                          ──────────────────────────────
    MPClient.add_request ──PUSH  ipc://…/input ──> PULL  ─┐
    MPClient.abort       ──┘                              ├─ loop: drain inputs; EngineDriver
    output reader task  <──PULL  ipc://…/output <── PUSH ─┘        send OutputsMsg per step
    liveness watch: the process died -> every in-flight request fails, is_alive = False

The HTTP process binds both sockets, so a dead engine never blocks a send: ZMQ queues it.
Messages: engine/messages.py.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import traceback
from dataclasses import dataclass

import msgspec

from pagedserve.config import EngineConfig
from pagedserve.engine.driver import EngineDriver
from pagedserve.engine.messages import ErrorMsg, InputMsg, ReadyMsg

logger = logging.getLogger(__name__)
# The engine process's log settings for the tensor-parallel worker processes it spawns, which
# inherit its environment (executor/worker.py reads them); set from run_engine_core's `log`.
ENV_LOG_LEVEL, ENV_LOG_JSON = "PAGEDSERVE_ENGINE_LOG_LEVEL", "PAGEDSERVE_ENGINE_LOG_JSON"


@dataclass(frozen=True, slots=True)
class LogSettings:
    """The server's log format, handed to the engine process explicitly (its lines match)."""

    level: str
    json: bool = True
# How often an engine with nothing to step but grammars being prepared looks for them.
GRAMMAR_POLL_MS = 5


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str, log: LogSettings | None = None) -> None:
    """Entry point of the engine-core process (multiprocessing spawn target)."""
    import zmq

    from pagedserve.engine.engine_core import EngineCore
    from pagedserve.engine.parent_watch import guard_parent, parent_is_alive
    from pagedserve.worker.cpu_resources import configure_engine_threads

    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None and parent.pid is not None else os.getppid()
    guard_parent(parent_pid)  # never outlive the server (prctl death signal + watchdog thread)
    if log is not None:  # the server's log format, for this process's lines too
        from pagedserve.ops.logging import configure_logging

        configure_logging(log.level, json=log.json)
        os.environ[ENV_LOG_LEVEL], os.environ[ENV_LOG_JSON] = log.level, "1" if log.json else "0"
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
    driver = EngineDriver(core)
    try:
        while True:
            busy = driver.has_work()
            # Block for input only when idle; the timeout lets an orphan notice its parent died.
            # While only grammars are being prepared, poll briefly for them instead of stepping.
            events = dict(poller.poll(0 if busy else (GRAMMAR_POLL_MS if core.has_unfinished_requests() else 1000)))
            inputs: list[InputMsg] = []
            while events:
                try:
                    inputs.append(decoder.decode(in_sock.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
            if not driver.apply(inputs):
                return
            report = driver.step(report_idle=bool(inputs) or busy)  # went idle: report the freed KV cache
            if report is not None:
                out_sock.send(encoder.encode(report))
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
