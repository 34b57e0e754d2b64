"""The scheduler's gauges (a mixin of Scheduler): the KV slots a planned step holds and wastes,
and the SchedulerStats snapshot the engine reports after each step (core/stats.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.core.stats import SchedulerStats

if TYPE_CHECKING:
    from pagedserve.core.kv_cache_manager import KVCacheManager
    from pagedserve.core.outputs import SchedulerOutput
    from pagedserve.core.request import Request
    from pagedserve.core.slo_scheduler import SchedulerSlo


class SchedulerGauges:
    """Needs of the Scheduler it is mixed into (declared for the type checker)."""

    kv: KVCacheManager
    block_size: int
    requests: dict[str, Request]
    running: list[Request]
    waiting: list[Request]
    swapped: list[Request]
    num_preemptions: int
    slo: SchedulerSlo | None

    def num_waiting_ahead(self, priority_class: str) -> int:
        raise NotImplementedError

    def kv_slot_usage(self, scheduler_output: SchedulerOutput) -> tuple[int, int]:
        """(allocated, wasted) KV slots of the scheduled requests for the planned step: slots in
        their blocks, and those holding no token after it. Call right after schedule(), which has
        already advanced num_computed_tokens past the planned step."""
        allocated = wasted = 0
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests[req_id]
            slots = self.kv.num_blocks_of(req_id) * self.block_size
            allocated += slots
            wasted += slots - request.num_computed_tokens
        return allocated, wasted

    def make_stats(
        self, scheduler_output: SchedulerOutput | None, slot_usage: tuple[int, int] = (0, 0)
    ) -> SchedulerStats:
        """Queue and cache gauges as they stand now (after the step's update); without a plan,
        between steps (nothing scheduled, no slots in use)."""
        stats = self.kv.prefix_stats
        num_followers = sum(len(r.followers) for r in self.running + self.waiting + self.swapped)
        out = SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting) + num_followers,
            num_swapped=len(self.swapped),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=stats.queries,
            prefix_cache_hits=stats.hits,
            num_preemptions=self.num_preemptions,
            num_scheduled_tokens=scheduler_output.total_num_scheduled_tokens if scheduler_output is not None else 0,
            kv_slots_allocated=slot_usage[0],
            kv_slots_wasted=slot_usage[1],
            num_waiting_batch=self.num_waiting_ahead("batch"),
        )
        if self.slo is not None:
            self.slo.fill_stats(out, self.running, self.waiting)
        return out
