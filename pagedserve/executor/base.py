"""The executor: what EngineCore drives the model side through, whatever the number of ranks.

    EngineCore ── launch(plan) / collect(handle) ──> Executor ──> ModelRunner(s)
                                                      uni: the runner in this process
                                                      mp:  one worker process per tensor-parallel
                                                           rank; the plan goes to every rank,
                                                           rank 0's ModelRunnerOutput comes back

Start-up is the same three calls for both: construct (load the weights), determine_num_blocks
(the KV cache each rank can hold: the minimum over the ranks is what every rank allocates, so a
block id means the same slots everywhere), initialize_kv_cache (allocate; capture CUDA graphs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from pagedserve.core.outputs import ModelRunnerOutput, SchedulerOutput

__all__ = ["Executor", "LaunchedStep", "WorkerDiedError"]


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process died or failed: the engine cannot step any more."""


class LaunchedStep(Protocol):
    """A step handed to the model side. is_async: its output is not known yet (collect waits)."""

    @property
    def is_async(self) -> bool: ...


class Executor(ABC):
    vocab_size: int  # the model's vocabulary (logits width), from rank 0
    load_seconds: float  # weights load time (the slowest rank)
    cuda_graph_capture_seconds: float | None = None  # None: no graphs (CPU, enforce_eager)

    @abstractmethod
    def determine_num_blocks(self) -> tuple[int, int]:
        """(device KV blocks, CPU swap blocks) that every rank can hold."""

    @abstractmethod
    def initialize_kv_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None: ...


    @abstractmethod
    def launch(self, plan: SchedulerOutput) -> LaunchedStep: ...

    @abstractmethod
    def collect(self, handle: LaunchedStep) -> ModelRunnerOutput: ...

    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.launch(plan))

    def check_health(self) -> None:
        """Raise WorkerDiedError when a rank is gone (cheap: called between steps when idle)."""
        return None

    def shutdown(self) -> None:
        """Stop the workers (idempotent)."""
        return None
