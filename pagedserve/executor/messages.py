"""What crosses between the executor's driver (the engine process) and its worker processes.

    driver ── PUSH ipc://<dir>/rank<r> ──> worker r      Call / Step / Shutdown, to every rank
    driver <── PULL ipc://<dir>/results ── every worker  Ready / Reply / StepOutput / Failure

Pickled (protocol 5): both ends are processes of one engine, and the plan holds SamplingParams
objects that pickle as they are. A step's message is the plan itself, the diff the scheduler
already makes (new requests in full, running ones as appended blocks and a count), encoded once
and sent to each rank.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import ModelRunnerOutput, SchedulerOutput

__all__ = [
    "Call", "Failure", "Ready", "Reply", "Shutdown", "Step", "StepOutput", "WorkerLaunch", "decode", "encode",
]


@dataclass(slots=True)
class WorkerLaunch:
    """Everything a worker process starts from (written to a file, its path on the command line)."""

    config: EngineConfig
    world_size: int
    plan_addrs: list[str]  # per rank
    result_addr: str
    store_path: str  # torch.distributed FileStore rendezvous
    parent_pid: int  # the engine process: the worker exits when it is gone


@dataclass(slots=True)
class Call:
    method: str  # "determine_num_blocks" | "initialize_kv_cache"
    args: tuple[Any, ...] = ()


@dataclass(slots=True)
class Step:
    plan: SchedulerOutput


@dataclass(slots=True)
class Shutdown:
    pass


@dataclass(slots=True)
class Ready:
    rank: int
    pid: int
    vocab_size: int
    load_seconds: float


@dataclass(slots=True)
class Reply:
    rank: int
    value: Any = None


@dataclass(slots=True)
class StepOutput:
    """Rank 0's output of the plan with this step_id (the other ranks send none)."""

    step_id: int
    output: ModelRunnerOutput = field(default_factory=lambda: ModelRunnerOutput(sampled_token_ids={}))


@dataclass(slots=True)
class Failure:
    rank: int
    message: str  # the exception and its traceback


def encode(msg: object) -> bytes:
    return pickle.dumps(msg, protocol=5)


def decode(raw: bytes) -> Any:
    return pickle.loads(raw)  # noqa: S301 - only this engine's own processes write these sockets
