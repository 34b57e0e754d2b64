"""One rank, in the engine's own process: the runner is called directly (no copies, no IPC)."""

from __future__ import annotations

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagedserve.executor.base import Executor, LaunchedStep
from pagedserve.worker.model_runner import ModelRunner, StepHandle

__all__ = ["UniprocExecutor"]


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config)
        self.vocab_size = self.runner.vocab_size
        self.load_seconds = self.runner.load_seconds

    def determine_num_blocks(self) -> tuple[int, int]:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_gpu_blocks, num_cpu_blocks)
        self.cuda_graph_capture_seconds = self.runner.cuda_graph_capture_seconds

    def launch(self, plan: SchedulerOutput) -> StepHandle:
        return self.runner.launch(plan)

    def collect(self, handle: LaunchedStep) -> ModelRunnerOutput:
        assert isinstance(handle, StepHandle)
        return self.runner.collect(handle)

    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(plan)
