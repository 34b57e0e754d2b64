"""The engine loop: step() = schedule -> execute -> update. Nothing else."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import EngineCoreOutput
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler, SchedulerStats
from pagedserve.worker.model_runner import ModelRunner

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
        self.runner = ModelRunner(config)
        num_gpu, num_cpu = self.runner.determine_num_blocks()
        cache = config.cache_config
        cache.num_gpu_blocks, cache.num_cpu_blocks = num_gpu, num_cpu
        capacity = num_gpu * cache.block_size
        if capacity < config.scheduler_config.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_gpu} blocks of {cache.block_size}), "
                f"fewer than max_model_len ({config.scheduler_config.max_model_len}): give the cache "
                "more memory or lower max_model_len"
            )
        self.runner.initialize_kv_cache(num_gpu, num_cpu)
        self.scheduler = Scheduler(config.scheduler_config, cache)
        self.stats = EngineStats(startup_seconds=time.perf_counter() - started)
        self.stats.extra["model_load_seconds"] = self.runner.load_seconds
        if self.runner.decode_graphs is not None:
            self.stats.extra["cuda_graph_capture_seconds"] = self.runner.decode_graphs.capture_seconds
        logger.info(
            "engine ready in %.1f s: %d GPU blocks (%d tokens), %d CPU swap blocks",
            self.stats.startup_seconds, num_gpu, capacity, num_cpu,
        )

    @property
    def kv_capacity_tokens(self) -> int:
        return self.config.cache_config.num_gpu_blocks * self.config.cache_config.block_size

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        plan = self.scheduler.schedule()
        slot_usage = self.scheduler.kv_slot_usage(plan)  # reads the pre-step token counts
        runner_output = self.runner.execute_model(plan)
        outputs = self.scheduler.update_from_output(plan, runner_output)
        self._record(self.scheduler.make_stats(plan, slot_usage))
        return outputs

    def _record(self, stats: SchedulerStats) -> None:
        self.stats.last = stats
        self.stats.num_steps += 1
        self.stats.num_scheduled_tokens += stats.num_scheduled_tokens
        self.stats.kv_slots_allocated += stats.kv_slots_allocated
        self.stats.kv_slots_wasted += stats.kv_slots_wasted
