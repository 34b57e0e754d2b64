"""Tensor parallelism: one worker process per rank, driven from the engine process.

    engine process (driver: no model, no process group)      worker r (r = 0 .. N-1)
    ────────────────────────────────────────────────────      ───────────────────────
    launch(plan):  encode once, PUSH to every rank   ──────>  runner.execute_model(plan)
                                                              (collectives among the ranks)
    collect():     PULL rank 0's StepOutput           <──────  rank 0 only
                   every POLL_S: is every worker alive?

All ranks are workers (vLLM's V1 layout): the driver never enters a collective, so a rank that
dies cannot hang it. Every wait polls the result socket in POLL_S slices and checks the workers
in between; a dead worker, a Failure message or a step past `step_timeout_s` raises
WorkerDiedError, which fails the engine (in the server: in-flight requests end with an error and
/health turns 503). The driver then kills the surviving ranks (a peer of a dead NCCL rank may be
blocked in a collective for good).

Steps stay in order: each rank runs the plans in the order sent, rank 0 answers in that order,
so collect() matches outputs to plans by step_id. With async scheduling the engine plans step
n+1 while the workers still compute step n (launch returns before the output exists).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Any

import zmq

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagedserve.distributed.communicator import worker_environment
from pagedserve.executor.base import Executor, LaunchedStep, WorkerDiedError
from pagedserve.executor.messages import (
    Call,
    Failure,
    Ready,
    Reply,
    Shutdown,
    Step,
    StepOutput,
    WorkerLaunch,
    decode,
    encode,
)
from pagedserve.worker.input_batch import is_plain_greedy

__all__ = ["MultiprocExecutor", "PendingStep"]

logger = logging.getLogger(__name__)
POLL_S = 0.1  # how often a wait looks at the workers' liveness
STARTUP_TIMEOUT_S = 600.0  # weights loading, the KV cache allocation, CUDA graph capture
SHUTDOWN_GRACE_S = 5.0


def step_timeout_s() -> float:
    """vLLM's VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (or PAGEDSERVE_EXECUTE_MODEL_TIMEOUT_S): a step
    that takes longer means a rank is stuck."""
    for name in ("PAGEDSERVE_EXECUTE_MODEL_TIMEOUT_S", "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"):
        if os.environ.get(name):
            return float(os.environ[name])
    return 300.0


@dataclass(slots=True)
class PendingStep:
    """A plan sent to the workers; `output` once rank 0's answer was read."""

    step_id: int
    output: ModelRunnerOutput | None = None

    @property
    def is_async(self) -> bool:
        return self.output is None


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.world_size = config.parallel_config.world_size
        self.step_timeout_s = step_timeout_s()
        self.dead_reason: str | None = None
        self._dir = tempfile.mkdtemp(prefix="pagedserve-tp-")
        self._ctx = zmq.Context()
        self._results = self._ctx.socket(zmq.PULL)
        result_addr = f"ipc://{self._dir}/results"
        self._results.bind(result_addr)
        self._plans = []
        plan_addrs = []
        for rank in range(self.world_size):
            sock = self._ctx.socket(zmq.PUSH)
            addr = f"ipc://{self._dir}/rank{rank}"
            sock.bind(addr)
            self._plans.append(sock)
            plan_addrs.append(addr)
        self._procs: list[subprocess.Popen[bytes]] = []
        # the stop of last resort (the object dropped without shutdown(), the interpreter exiting)
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._ctx, self._dir, 0.0)
        launch = WorkerLaunch(config, self.world_size, plan_addrs, result_addr,
                              f"{self._dir}/store", os.getpid())  # fmt: skip
        launch_path = f"{self._dir}/launch.pkl"
        with open(launch_path, "wb") as f:
            f.write(encode(launch))
        env = worker_environment(os.environ, config.device)
        for rank in range(self.world_size):
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", "pagedserve.executor.worker", launch_path, str(rank)], env=env,
            ))  # fmt: skip
        self._unread: dict[int, ModelRunnerOutput] = {}  # rank 0's outputs read ahead of collect
        self._overlappable: dict[str, bool] = {}  # req_id -> may its steps stay in flight
        try:
            readies: list[Ready] = self._gather(Ready, STARTUP_TIMEOUT_S, "start-up")
        except BaseException:
            self.shutdown()
            raise
        by_rank = {r.rank: r for r in readies}
        self.vocab_size = by_rank[0].vocab_size
        self.load_seconds = max(r.load_seconds for r in readies)
        self.pids = [by_rank[r].pid for r in range(self.world_size)]
        logger.info("tensor parallelism: %d worker processes (pids %s), %s",
                    self.world_size, self.pids, "NCCL" if config.device == "cuda" else "gloo")  # fmt: skip

    # ---------------------------------------------------------------- start-up calls

    def _call(self, method: str, *args: Any) -> list[Any]:
        """Run `method` on every rank; the replies in rank order."""
        self._send(encode(Call(method, args)))
        replies: list[Reply] = self._gather(Reply, STARTUP_TIMEOUT_S, method)
        return [r.value for r in sorted(replies, key=lambda r: r.rank)]

    def determine_num_blocks(self) -> tuple[int, int]:
        """The minimum over the ranks (ranks on one host see the same budget, GPUs may differ)."""
        counts = self._call("determine_num_blocks")
        return min(c[0] for c in counts), min(c[1] for c in counts)

    def initialize_kv_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        seconds = [s for s in self._call("initialize_kv_cache", num_gpu_blocks, num_cpu_blocks) if s is not None]
        self.cuda_graph_capture_seconds = max(seconds) if seconds else None

    # ---------------------------------------------------------------- steps

    def launch(self, plan: SchedulerOutput) -> PendingStep:
        """Send the plan; the step stays in flight (async) only where the in-process runner's
        would: when every scheduled request is plain greedy without prompt logprobs. Any other
        step is collected here, so the engine updates it before planning the next (a grammar's
        next mask needs this step's token)."""
        for req_id in plan.finished_req_ids:
            self._overlappable.pop(req_id, None)
        for new in plan.scheduled_new_reqs:
            params = new.sampling_params
            self._overlappable[new.req_id] = is_plain_greedy(params) and params.prompt_logprobs is None
        self._send(encode(Step(plan)))
        handle = PendingStep(plan.step_id)
        if plan.is_empty:  # only forgets requests / moves blocks: nothing to sample, no answer
            handle.output = ModelRunnerOutput(sampled_token_ids={})
        elif not all(self._overlappable[r] for r in plan.num_scheduled_tokens):
            self.collect(handle)
        return handle

    def collect(self, handle: LaunchedStep) -> ModelRunnerOutput:
        assert isinstance(handle, PendingStep)
        if handle.output is None:
            deadline = time.monotonic() + self.step_timeout_s
            while handle.step_id not in self._unread:
                msg = self._next(deadline, f"step {handle.step_id}")
                if not isinstance(msg, StepOutput):
                    raise self._fail(f"unexpected {type(msg).__name__} from a worker during a step")
                self._unread[msg.step_id] = msg.output
            handle.output = self._unread.pop(handle.step_id)
        return handle.output

    # ---------------------------------------------------------------- health

    def check_health(self) -> None:
        if self.dead_reason is not None:
            raise WorkerDiedError(self.dead_reason)
        for rank, proc in enumerate(self._procs):
            code = proc.poll()
            if code is not None:
                raise self._fail(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}")

    def _fail(self, reason: str) -> WorkerDiedError:
        """Record the failure, stop every worker, and return the error to raise."""
        if self.dead_reason is None:
            self.dead_reason = reason
            logger.error("tensor-parallel executor failed: %s", reason)
            _kill(self._procs)
        return WorkerDiedError(self.dead_reason)

    def _send(self, raw: bytes) -> None:
        self.check_health()
        for sock in self._plans:
            sock.send(raw)  # queued by ZMQ: never blocks on a busy rank

    def _next(self, deadline: float, what: str) -> Any:
        """The next message of any worker; raises WorkerDiedError on a death, a Failure or the
        deadline."""
        while True:
            self.check_health()
            if self._results.poll(int(POLL_S * 1000)):
                msg = decode(self._results.recv())
                if isinstance(msg, Failure):
                    # a rank's collective fails when a peer died: name the dead one, the cause
                    for _ in range(5):
                        self.check_health()
                        time.sleep(POLL_S)
                    raise self._fail(f"tensor-parallel rank {msg.rank} failed: {msg.message}")
                return msg
            if time.monotonic() > deadline:
                raise self._fail(f"no answer from the workers in time ({what}): a rank is stuck")

    def _gather(self, kind: type, timeout_s: float, what: str) -> list[Any]:
        """One message of `kind` from every rank."""
        deadline = time.monotonic() + timeout_s
        got: dict[int, Any] = {}
        while len(got) < self.world_size:
            msg = self._next(deadline, what)
            if not isinstance(msg, kind):
                raise self._fail(f"unexpected {type(msg).__name__} from a worker during {what}")
            got[msg.rank] = msg  # type: ignore[attr-defined]
        return list(got.values())

    def shutdown(self) -> None:
        if self._finalizer.alive:
            if self.dead_reason is None:
                for sock in self._plans:
                    sock.send(encode(Shutdown()))
            self._finalizer.detach()
            _stop(self._procs, self._ctx, self._dir, SHUTDOWN_GRACE_S)


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _stop(procs: list[subprocess.Popen[bytes]], ctx: Any, directory: str, grace_s: float) -> None:
    """Wait up to `grace_s` for the workers to exit, kill the rest, release the sockets."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    _kill(procs)
    ctx.destroy(linger=0)
    shutil.rmtree(directory, ignore_errors=True)
