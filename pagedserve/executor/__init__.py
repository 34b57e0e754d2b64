"""Between EngineCore and the model runners: one rank in-process, or one process per rank."""

from __future__ import annotations

from pagedserve.config import EngineConfig
from pagedserve.executor.base import Executor, LaunchedStep, WorkerDiedError

__all__ = ["Executor", "LaunchedStep", "WorkerDiedError", "create_executor"]


def create_executor(config: EngineConfig) -> Executor:
    """The executor `config.parallel_config` asks for ("uni" for one rank unless told "mp")."""
    if config.parallel_config.executor_backend == "mp":
        from pagedserve.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    from pagedserve.executor.uniproc import UniprocExecutor

    return UniprocExecutor(config)
