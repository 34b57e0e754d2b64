"""Preemption and swap-in, the scheduler's part (a mixin of Scheduler): when blocks or seats run
out, the lowest-ranked running request leaves the GPU, by recompute (its blocks freed, it waits
again from token 0) or by swap (its blocks copied to CPU blocks, it waits in `swapped`); swapped
requests come back before new ones are admitted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from pagedserve.config import SchedulerConfig
    from pagedserve.core.kv_cache_manager import KVCacheManager


class Preemption:
    """Needs of the Scheduler it is mixed into (declared for the type checker)."""

    config: SchedulerConfig
    kv: KVCacheManager
    running: list[Request]
    waiting: list[Request]
    swapped: list[Request]
    finished_req_ids: set[str]
    num_preemptions: int
    num_swap_outs: int
    _max_seqs: int
    _num_scheduled: dict[str, int]
    _copies: list[tuple[int, int]]
    _swap_out: list[tuple[int, int]]

    def _rank(self, request: Request) -> tuple[float, ...]:
        raise NotImplementedError

    def _insert_by_rank(self, queue: list[Request], request: Request) -> None:
        raise NotImplementedError

    def _token_in_flight(self, request: Request) -> bool:
        raise NotImplementedError

    def _pick_victim(self) -> Request:
        """The lowest-ranked running request: the latest arrival under FCFS, else the worst
        priority (then the latest arrival)."""
        return max(self.running, key=self._rank)

    def _evict_lower_priority(self, request: Request) -> int | None:
        """Priority policy (or an interactive request over a batch one): preempt (by recompute) a
        running request ranked below the waiting one. Returns the budget it gives back, or None
        when there is no such request."""
        if not self.running:
            return None
        victim = self._pick_victim()
        if self._rank(victim) <= self._rank(request):
            return None
        if self.config.policy != "priority" and victim.priority_class == request.priority_class:
            return None
        return self._preempt(victim, force_recompute=True)

    def _preempt(self, victim: Request, force_recompute: bool = False) -> int:
        """Take the victim off the GPU. Returns the tokens it had been granted this step."""
        self.num_preemptions += 1
        victim.num_preemptions += 1
        granted = self._num_scheduled.pop(victim.request_id, 0)
        self.running.remove(victim)
        self.finished_req_ids.add(victim.request_id)  # the worker forgets it until it returns
        victim.needs_full_data = True
        # A token still pending (async scheduling: the step in flight samples it) is kept: it
        # arrives at that step's update, and the victim is not resumed before (else it could be
        # preempted again and again before it keeps any token: a livelock).
        victim_blocks = set(self.kv.block_ids(victim.request_id))
        forked_now = any(dst in victim_blocks for _, dst in self._copies)
        if forked_now:  # its partial block was never filled: drop the copy
            self._copies = [c for c in self._copies if c[1] not in victim_blocks]
        use_swap = (
            self.config.preemption_mode == "swap"
            and not force_recompute
            and not forked_now
            and self.kv.can_swap_out(victim)
        )
        if use_swap:
            self.num_swap_outs += 1
            # (the step in flight writes into the blocks before the swap-out copies them: both
            # are queued on the device in that order)
            self._swap_out.extend(self.kv.swap_out(victim))
            victim.status = RequestStatus.SWAPPED
            self._insert_by_rank(self.swapped, victim)
        else:
            self.kv.free(victim)
            victim.num_computed_tokens = 0
            victim.status = RequestStatus.WAITING
            self._insert_by_rank(self.waiting, victim)
        return granted

    # ---------------------------------------------------------------- swap-in

    def _schedule_swapped(self, budget: int, swap_in: list[tuple[int, int]]) -> int:
        while self.swapped and budget > 0 and len(self.running) < self._max_seqs:
            request = self.swapped[0]
            if self._token_in_flight(request):  # resume after its update
                break
            num_new = min(request.max_computable_tokens - request.num_computed_tokens, budget)
            if not self.kv.can_swap_in(request, num_new):
                break
            self.swapped.pop(0)
            swap_in.extend(self.kv.swap_in(request))
            allocated = self.kv.allocate_slots(request, num_new)
            assert allocated is not None
            request.status = RequestStatus.RUNNING
            request.needs_full_data = True
            self.running.append(request)
            if num_new > 0:
                self._num_scheduled[request.request_id] = num_new
                budget -= num_new
        return budget

    def _may_admit_waiting(self) -> bool:
        """Swapped requests come back before new ones are admitted (else they could starve);
        under the priority policy a waiting request ranked above every swapped one may go first."""
        if not self.swapped:
            return True
        return (
            self.config.policy == "priority"
            and bool(self.waiting)
            and self._rank(self.waiting[0]) < self._rank(self.swapped[0])
        )
