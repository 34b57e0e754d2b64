"""Compiling structured-output grammars off the event loop, once per spec, under a deadline.

    GrammarService.compile(spec, timeout_s)            (AsyncLLM's, on the HTTP event loop)
      digest in the LRU            -> the serialized grammar (or the spec's error) at once
      same spec already compiling  -> await that compile (identical specs compile once)
      else                         -> a worker process: compile, serialize, send back
                                      past the deadline: the worker is killed and replaced,
                                      the caller gets GrammarTimeout (cached like any error)

Why processes: xgrammar does release the GIL while compiling (so a thread would not stall the
loop), but a thread cannot be stopped, and a pathological spec (an enum of 100,000 values took
513 s) would hold a core, and the compile slot, long after its 400. A process can be killed.

The result crosses to the engine as xgrammar's serialized JSON (CompiledGrammar.serialize_json;
the engine deserializes it against its own TokenizerInfo): the engine never compiles again.
Worker start-up (importing xgrammar, ~4 s) is not counted against the deadline; workers start on
the first structured request and stay up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.structured_output import KIND_NAMES, GrammarError, compile_spec, spec_digest, tokenizer_info

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 300.0  # a worker that does not report ready by then is a server fault


class GrammarTimeout(GrammarError):
    """The spec did not compile within the deadline."""


def _worker_main(conn: Any, info_json: str) -> None:
    """A compile worker: (kind, text) in, ("ok", serialized) or ("error", message) out."""
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(info_json), cache_enabled=False)
    conn.send(("ready", ""))
    while True:
        try:
            key = conn.recv()
        except EOFError:
            return
        if key is None:
            return
        try:
            conn.send(("ok", compile_spec(compiler, key).serialize_json()))
        except GrammarError as e:
            conn.send(("error", str(e)))
        except Exception:  # noqa: BLE001 - never leak internals to the client; log them here
            logging.getLogger(__name__).exception("grammar compile worker failed")
            conn.send(("error", f"invalid structured output {key[0]}: it could not be compiled."))


class _Worker:
    def __init__(self, info_json: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, info_json),
                                name="pagedserve-grammar-compiler", daemon=True)
        self.proc.start()
        child.close()

    def wait_ready(self) -> None:  # blocking: run in a thread
        if not self.conn.poll(_START_TIMEOUT_S):
            raise RuntimeError("the grammar compile worker did not start")
        self.conn.recv()

    def run(self, key: tuple[str, str]) -> tuple[str, str]:  # blocking: run in a thread
        self.conn.send(key)
        return self.conn.recv()  # EOFError/OSError once killed

    def kill(self) -> None:
        # the pipe is left to the GC: a thread may still be blocked reading it, and gets EOF now
        self.proc.kill()
        self.proc.join(5)


@dataclass(slots=True)
class _Result:
    serialized: str | None
    error: tuple[type[GrammarError], str] | None  # (class, message) of the spec's error
    size: int


class GrammarService:
    """Serialized compiled grammars for one tokenizer, compiled by `num_workers` processes.

    The LRU holds at most `cache_entries` results and `cache_bytes` of serialized grammars; errors
    (timeouts included) are cached too, so a pathological spec sent again costs nothing.
    `num_compiles` counts compiles handed to workers (tests)."""

    def __init__(self, tokenizer: Any, vocab_size: int, num_workers: int = 2, cache_entries: int = 256,
                 cache_bytes: int = 256 << 20) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self.num_workers = num_workers
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        self.num_compiles = 0
        self._info_json: str | None = None
        self._results: OrderedDict[str, _Result] = OrderedDict()
        self._cached_bytes = 0
        self._inflight: dict[str, asyncio.Future[_Result]] = {}  # digest -> its compile task
        self._idle: asyncio.Queue[_Worker] | None = None
        self._workers: set[_Worker] = set()  # started (idle or busy)
        self._start_lock = threading.Lock()
        # blocking pipe reads happen here, never on the loop (nor the loop's default executor)
        self._threads = ThreadPoolExecutor(max_workers=num_workers + 1, thread_name_prefix="pagedserve-grammar")
        self._starting = 0
        self._closed = False

    async def compile(self, spec: StructuredOutputsParams, timeout_s: float) -> str:
        """The serialized grammar of `spec`; GrammarError (GrammarTimeout) when it does not
        compile (within `timeout_s` seconds of a worker taking it)."""
        digest = spec_digest(spec)
        result = self._results.get(digest)
        if result is not None:
            self._results.move_to_end(digest)
        else:
            # one task per digest, shared by every caller and not cancelled with any of them
            # (a client that goes away leaves the result cached for the next one)
            task = self._inflight.get(digest)
            if task is None:
                task = asyncio.ensure_future(self._compile_and_remember(digest, spec, timeout_s))
                task.add_done_callback(_retrieve)  # every caller may be gone by then
                self._inflight[digest] = task
            result = await asyncio.shield(task)
        if result.error is not None:
            raise result.error[0](result.error[1])  # a fresh exception: no shared traceback
        assert result.serialized is not None
        return result.serialized

    async def _compile_and_remember(self, digest: str, spec: StructuredOutputsParams, timeout_s: float) -> _Result:
        try:
            result = await self._compile(spec, timeout_s)
            self._remember(digest, result)
            return result
        finally:
            del self._inflight[digest]

    async def _compile(self, spec: StructuredOutputsParams, timeout_s: float) -> _Result:
        worker = await self._acquire()
        loop = asyncio.get_running_loop()
        self.num_compiles += 1
        reply = loop.run_in_executor(self._threads, worker.run, spec.key)
        reply.add_done_callback(_retrieve)  # a killed worker's read fails after we stopped waiting
        try:
            status, payload = await asyncio.wait_for(asyncio.shield(reply), timeout_s)
        except TimeoutError:
            self._discard(worker)  # its pipe read then fails: the thread ends
            logger.warning("structured output spec (%s) did not compile within %g s; worker killed",
                           spec.key[0], timeout_s)
            return _Result(None, (GrammarTimeout,
                                  f"the {_kind_name(spec)} is too complex to compile within {timeout_s:g} s."), 0)
        except (EOFError, OSError):  # the worker died (e.g. out of memory)
            self._discard(worker)
            return _Result(None, (GrammarError, f"the {_kind_name(spec)} could not be compiled."), 0)
        except BaseException:  # cancelled: the worker may still be busy, so it cannot be reused
            self._discard(worker)
            raise
        self._release(worker)
        if status == "ok":
            return _Result(payload, None, len(payload))
        return _Result(None, (GrammarError, payload), 0)

    async def _acquire(self) -> _Worker:
        """An idle worker, or a new one while fewer than num_workers are up. Waiters look again
        every second, so a worker that fails to start never strands them."""
        if self._idle is None:
            self._idle = asyncio.Queue()
        while True:
            if not self._idle.empty():
                return self._idle.get_nowait()
            if len(self._workers) + self._starting < self.num_workers:
                self._starting += 1
                try:
                    worker = await asyncio.get_running_loop().run_in_executor(self._threads, self._start_worker)
                finally:
                    self._starting -= 1
                self._workers.add(worker)
                return worker
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(self._idle.get(), 1.0)

    def _start_worker(self) -> _Worker:  # in a thread: TokenizerInfo and the spawn take seconds
        with self._start_lock:
            if self._info_json is None:
                self._info_json = tokenizer_info(self._tokenizer, self._vocab_size).serialize_json()
        worker = _Worker(self._info_json)
        try:
            worker.wait_ready()
        except BaseException:
            worker.kill()
            raise
        return worker

    def _release(self, worker: _Worker) -> None:
        assert self._idle is not None
        if self._closed:
            worker.kill()
        else:
            self._idle.put_nowait(worker)

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.discard(worker)

    def _remember(self, digest: str, result: _Result) -> None:
        if result.size > self.cache_bytes:
            return
        self._results[digest] = result
        self._cached_bytes += result.size
        while len(self._results) > self.cache_entries or self._cached_bytes > self.cache_bytes:
            _, old = self._results.popitem(last=False)
            self._cached_bytes -= old.size

    def shutdown(self) -> None:
        self._closed = True
        for worker in list(self._workers):
            self._discard(worker)
        self._threads.shutdown(wait=False, cancel_futures=True)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _kind_name(spec: StructuredOutputsParams) -> str:
    kind = spec.key[0]
    return "schema" if kind in ("json", "json_object") else KIND_NAMES[kind]
