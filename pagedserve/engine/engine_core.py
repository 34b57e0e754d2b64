"""The engine loop: step() = schedule -> execute -> update (`_step_sync`). Nothing else.

With async scheduling (EngineArgs.async_scheduling, vLLM's --async-scheduling; `_step_async`,
chosen once at start-up) execute is split into launch and collect, and one step may stay in
flight across step() calls, so the host plans and launches step n+1 while the device still runs
step n:

    step():  schedule n+1 -> launch n+1 -> collect n -> update n
             (-> collect n+1 -> update n+1, when step n+1 sampled synchronously anyway)

Step n+1 is planned before step n's tokens are known: the scheduler counts them as pending and
the runner takes them from step n's output on the device. A request that finishes at update n
(a stop token, a stop string, an abort) may already be part of step n+1: that step's token for it
is dropped. Its blocks are freed at update n and may go to another request in step n+2, which is
safe because the device runs steps in launch order: step n+1's writes into those blocks land
before anything step n+2 writes or reads there.

Structured outputs: the plan carries the step's grammar bitmasks (plan.grammar, filled by
self.grammars right after schedule, only when structured requests sample), and update feeds their
sampled tokens back to the matchers. Grammars and the tokenizer stay here; the worker has neither.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.core.async_scheduler import AsyncScheduler
from pagedserve.core.outputs import EngineCoreOutput, FinishReason, ModelRunnerOutput, SchedulerOutput
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.stats import SchedulerStats
from pagedserve.engine.grammars import EngineGrammars
from pagedserve.executor import Executor, LaunchedStep, create_executor
from pagedserve.structured_output import GrammarCompilerCache

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    """Counters over the engine's life, plus the last step's scheduler snapshot."""

    last: SchedulerStats | None = None
    num_steps: int = 0
    num_scheduled_tokens: int = 0
    kv_slots_allocated: int = 0  # summed over steps
    kv_slots_wasted: int = 0
    startup_seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def kv_slot_waste(self) -> float:
        """Fraction of allocated KV slots that held no token, averaged over steps by slot."""
        return self.kv_slots_wasted / self.kv_slots_allocated if self.kv_slots_allocated else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        if self.last is None or not self.last.prefix_cache_queries:
            return 0.0
        return self.last.prefix_cache_hits / self.last.prefix_cache_queries


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        started = time.perf_counter()
        self.config = config
        # the model side: the runner in this process, or one worker process per tensor-parallel rank
        self.executor: Executor = create_executor(config)
        try:
            self._start(config, started)
        except BaseException:
            self.executor.shutdown()
            raise

    def _start(self, config: EngineConfig, started: float) -> None:
        num_gpu, num_cpu = self.executor.determine_num_blocks()
        cache = config.cache_config
        cache.num_gpu_blocks, cache.num_cpu_blocks = num_gpu, num_cpu
        capacity = num_gpu * cache.block_size
        if capacity < config.scheduler_config.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_gpu} blocks of {cache.block_size}), "
                f"fewer than max_model_len ({config.scheduler_config.max_model_len}): give the cache "
                "more memory or lower max_model_len"
            )
        self.executor.initialize_kv_cache(num_gpu, num_cpu)
        scheduler_cls = AsyncScheduler if config.async_scheduling else Scheduler  # chosen once
        self.scheduler = scheduler_cls(config.scheduler_config, cache)
        self.stats = EngineStats(startup_seconds=time.perf_counter() - started)
        self.async_scheduling = config.async_scheduling
        self._step: Callable[[], list[EngineCoreOutput]] = self._step_async if self.async_scheduling else self._step_sync
        # async scheduling: the launched step not yet updated (plan, handle, KV slot usage)
        self._in_flight: tuple[SchedulerOutput, LaunchedStep, tuple[int, int]] | None = None
        # structured outputs: a request waits in `grammars` (not the scheduler) until its grammar
        # is ready; one that cannot get one finishes as aborted (`_failed`, sent with the next step)
        self.grammars = EngineGrammars(self._make_grammar_cache)
        self._failed: list[EngineCoreOutput] = []
        self.stats.extra["model_load_seconds"] = self.executor.load_seconds
        if self.executor.cuda_graph_capture_seconds is not None:
            self.stats.extra["cuda_graph_capture_seconds"] = self.executor.cuda_graph_capture_seconds
        logger.info(
            "engine ready in %.1f s: %d %s KV blocks (%d tokens), %d swap blocks",
            self.stats.startup_seconds, num_gpu, "CPU" if config.device == "cpu" else "GPU", capacity, num_cpu,
        )

    @property
    def runner(self) -> Any:
        """The ModelRunner, when it runs in this process (tensor_parallel_size 1)."""
        runner = getattr(self.executor, "runner", None)
        if runner is None:
            raise AttributeError("the model runners live in the tensor-parallel worker processes")
        return runner

    @property
    def vocab_size(self) -> int:
        return self.executor.vocab_size

    def check_health(self) -> None:
        """Raises WorkerDiedError when a tensor-parallel rank is gone (between steps)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()

    @property
    def kv_capacity_tokens(self) -> int:
        return self.config.cache_config.num_gpu_blocks * self.config.cache_config.block_size

    def _make_grammar_cache(self, is_pinned: Callable[[str], bool]) -> GrammarCompilerCache:
        from pagedserve.engine.request_builder import load_tokenizer

        return GrammarCompilerCache(load_tokenizer(self.config), self.executor.vocab_size, is_pinned=is_pinned)

    def add_request(self, request: Request, grammar: str | None = None) -> None:
        """grammar: the serialized compiled grammar of a structured request, when the front end
        compiled it in another process (see structured_output.py)."""
        if self.grammars.add(request, grammar):
            self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.grammars.abort(request_ids)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    @property
    def step_in_flight(self) -> bool:
        return self._in_flight is not None

    def has_unfinished_requests(self) -> bool:
        """True while requests are unfinished (also those waiting for their grammar) or a step is
        in flight (loops drain it)."""
        return (self.scheduler.has_unfinished_requests() or self._in_flight is not None
                or self.grammars.num_waiting > 0)

    def admit_ready(self) -> bool:
        """Hand requests whose grammar became ready to the scheduler; True when a step has work
        (False while only grammars are pending: loops then wait instead of spinning)."""
        ready, failed = self.grammars.take_ready()
        for request in ready:
            self.scheduler.add_request(request)
        for request, error in failed:
            logger.error("request %s: its structured output grammar failed: %s", request.request_id, error)
            for child in [request, *request.followers]:
                self.grammars.release(child.request_id)
                self._failed.append(EngineCoreOutput(child.request_id, [], FinishReason.ABORT))
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None or bool(self._failed)

    def step(self) -> list[EngineCoreOutput]:
        self.admit_ready()
        failed, self._failed = self._failed, []
        outputs = failed + self._step()  # _step_sync or _step_async, chosen at start-up
        for output in outputs:
            if output.finish_reason is not None:
                self.grammars.release(output.req_id)
        return outputs

    def _plan(self) -> tuple[SchedulerOutput, tuple[int, int]]:
        plan = self.scheduler.schedule()
        slot_usage = self.scheduler.kv_slot_usage(plan)  # right after schedule (see there)
        plan.grammar = self.grammars.fill_bitmask(plan)  # structured outputs' masks, or None
        return plan, slot_usage

    def _step_sync(self) -> list[EngineCoreOutput]:
        """schedule -> execute -> update."""
        plan, slot_usage = self._plan()
        return self._update(plan, self.executor.execute_model(plan), slot_usage)

    def _step_async(self) -> list[EngineCoreOutput]:
        """Async scheduling (vLLM's step_with_batch_queue): schedule n+1 -> launch n+1 ->
        collect n -> update n; step n+1 stays in flight until the next call, unless it sampled
        synchronously anyway (then it is updated now, not a step late)."""
        plan, slot_usage = self._plan()
        handle = self.executor.launch(plan)
        previous, self._in_flight = self._in_flight, (plan, handle, slot_usage)
        outputs = self._finish_step(*previous) if previous is not None else []
        if not handle.is_async:
            self._in_flight = None
            outputs += self._finish_step(plan, handle, slot_usage)
        return outputs

    def _finish_step(
        self, plan: SchedulerOutput, handle: LaunchedStep, slot_usage: tuple[int, int]
    ) -> list[EngineCoreOutput]:
        return self._update(plan, self.executor.collect(handle), slot_usage)

    def _update(
        self, plan: SchedulerOutput, runner_output: ModelRunnerOutput, slot_usage: tuple[int, int]
    ) -> list[EngineCoreOutput]:
        self.grammars.accept(runner_output.sampled_token_ids)  # nothing to do without grammars
        outputs = self.scheduler.update_from_output(plan, runner_output)
        self._record(self.scheduler.make_stats(plan, slot_usage))
        return outputs

    def idle_stats(self) -> SchedulerStats:
        """The scheduler's state between steps (after aborts drained the batch): no plan."""
        return self.scheduler.make_stats(None)

    def _record(self, stats: SchedulerStats) -> None:
        self.stats.last = stats
        self.stats.num_steps += 1
        self.stats.num_scheduled_tokens += stats.num_scheduled_tokens
        self.stats.kv_slots_allocated += stats.kv_slots_allocated
        self.stats.kv_slots_wasted += stats.kv_slots_wasted
