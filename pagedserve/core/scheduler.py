"""Continuous batching under a token budget, with no prefill and decode phases.

Every request has num_computed_tokens; each step hands out up to max_num_batched_tokens tokens:

    1. running requests, in order: the rest of their prompt (a chunk if the budget is short) or
       one decode token; when blocks run out, the lowest-ranked running request is preempted
       (recompute: drop its blocks; swap: copy them to CPU blocks);
    2. swapped requests come back (only in a step that preempted nothing);
    3. waiting requests are admitted, after a prefix-cache lookup (only in a step that preempted
       nothing and with nothing left swapped out; under the priority policy a waiting request may
       also evict lower-priority running ones, by recompute).

Rank: FCFS orders by arrival; the priority policy by (priority, arrival), lower first.

schedule() advances each scheduled request's num_computed_tokens at once, and counts the token a
step will sample as pending until update_from_output brings it. Synchronously (update right after
schedule) that changes nothing; it is what lets the engine plan step n+1 before step n's results
are back (async scheduling): step n+1 may then compute the position of step n's pending token.
The decisions only async scheduling needs (a pending token that ends a request, a preempted
request with a token in flight) are AsyncScheduler's (core/async_scheduler.py), chosen once by
the engine at start-up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from pagedserve.config import CacheConfig, SchedulerConfig
from pagedserve.core.fork import LeaderForks
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    LogprobsLists,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagedserve.core.preemption import Preemption
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler_gauges import SchedulerGauges
from pagedserve.core.slo_scheduler import SchedulerSlo
from pagedserve.core.stop_check import check_stop


class Scheduler(Preemption, SchedulerGauges, LeaderForks):
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(
            num_gpu_blocks=cache_config.num_gpu_blocks,
            num_cpu_blocks=cache_config.num_cpu_blocks,
            block_size=cache_config.block_size,
            enable_caching=cache_config.enable_prefix_caching,
        )
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # kept in rank order
        self.running: list[Request] = []  # in admission order
        self.swapped: list[Request] = []  # kept in rank order
        self.finished_req_ids: set[str] = set()  # to tell the worker next step
        self.num_preemptions = 0
        self.num_swap_outs = 0  # preemptions that swapped to CPU (the rest recomputed)
        self._num_scheduled: dict[str, int] = {}  # the plan being built by schedule()
        self._copies: list[tuple[int, int]] = []
        self._swap_out: list[tuple[int, int]] = []
        self._step_id = 0
        # step id -> req_id -> request as planned: an update applies only to that request object
        # (under async scheduling an id may be aborted and added again before the update).
        self._planned: dict[int, dict[str, Request]] = {}
        # SLOs with a TPOT objective: the controller sets the seat cap and the token budget of
        # every step (core/slo_controller.py); without, the configured maxima are the caps
        self.slo: SchedulerSlo | None = None
        if scheduler_config.slo is not None and scheduler_config.slo.tpot_s:
            self.slo = SchedulerSlo(scheduler_config.slo, scheduler_config.max_num_seqs,
                                    scheduler_config.max_num_batched_tokens, time.monotonic,
                                    chunked_prefill=scheduler_config.enable_chunked_prefill)
        self._max_seqs = scheduler_config.max_num_seqs

    # ---------------------------------------------------------------- requests in and out

    def _rank(self, request: Request) -> tuple[float, ...]:
        # the batch class yields to interactive requests whatever the policy
        batch = float(request.priority_class == "batch")
        if self.config.policy == "priority":
            return (batch, request.priority, request.arrival_time)
        return (batch, request.arrival_time)

    def _insert_by_rank(self, queue: list[Request], request: Request) -> None:
        rank = self._rank(request)
        index = len(queue)
        while index > 0 and self._rank(queue[index - 1]) > rank:
            index -= 1
        queue.insert(index, request)

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        for follower in request.followers:
            follower.status = RequestStatus.WAITING_FOR_FORK
            follower.leader = request
            self.requests[follower.request_id] = follower
        request.status = RequestStatus.WAITING
        self._insert_by_rank(self.waiting, request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish (usually abort) requests in any state, releasing everything they hold."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            for follower in request.followers:  # orphaned followers go with their leader
                self._finish(follower, status)
            request.followers.clear()
            if request.status == RequestStatus.WAITING_FOR_FORK and request.leader is not None:
                request.leader.followers.remove(request)
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status == RequestStatus.SWAPPED:
            self.swapped.remove(request)
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        self.finished_req_ids.add(request.request_id)

    def num_waiting_ahead(self, priority_class: str) -> int:
        """Waiting requests of this class (a new one queues behind them)."""
        batch = priority_class == "batch"
        return sum((r.priority_class == "batch") == batch for r in self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        self._num_scheduled = {}
        self._copies = []
        self._swap_out = []
        budget = self.config.max_num_batched_tokens
        if self.slo is not None:
            self._max_seqs, budget = self.slo.caps(self.running)
        step_budget = budget
        num_preempted_before = self.num_preemptions

        self._fork_ready_leaders()
        budget = self._schedule_running(budget)
        swap_in: list[tuple[int, int]] = []
        if self.num_preemptions == num_preempted_before:
            budget = self._schedule_swapped(budget, swap_in)
            if self._may_admit_waiting():
                self._schedule_waiting(budget)

        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        for request in self.running:
            num = self._num_scheduled.get(request.request_id)
            if num is None:
                continue
            if request.needs_full_data:
                block_ids = self.kv.block_ids(request.request_id)
                new_reqs.append(
                    NewRequestData(
                        req_id=request.request_id,
                        prompt_token_ids=request.prompt_token_ids,
                        output_token_ids=list(request.output_token_ids),
                        sampling_params=request.sampling_params,
                        block_ids=block_ids,
                        num_computed_tokens=request.num_computed_tokens,
                        eos_token_id=request.eos_token_id,
                    )
                )
                request.needs_full_data = False
                request.worker_num_blocks = len(block_ids)
            else:
                new_block_ids = self.kv.block_ids(request.request_id, request.worker_num_blocks)
                cached_reqs.append(
                    CachedRequestData(
                        req_id=request.request_id,
                        new_block_ids=new_block_ids,
                        num_computed_tokens=request.num_computed_tokens,
                    )
                )
                request.worker_num_blocks += len(new_block_ids)
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=dict(self._num_scheduled),
            total_num_scheduled_tokens=sum(self._num_scheduled.values()),
            finished_req_ids=self.finished_req_ids,
            blocks_to_swap_out=self._swap_out,
            blocks_to_swap_in=swap_in,
            blocks_to_copy=[c for c in self._copies if c[0] >= 0],
        )
        self.finished_req_ids = set()
        self._step_id += 1
        output.step_id = self._step_id
        if self.slo is not None:
            num_interactive = self.num_waiting_ahead("interactive")
            self.slo.planned(output, self.requests, (num_interactive, len(self.waiting) - num_interactive),
                             self._max_seqs, step_budget, self.running)
        planned: dict[str, Request] = {}
        for request in self.running:
            num = self._num_scheduled.get(request.request_id)
            if num is None:
                continue
            planned[request.request_id] = request
            # the step reaches past every known and pending token: it samples one more
            samples = request.num_computed_tokens + num == request.num_tokens + request.num_pending
            request.num_computed_tokens += num
            request.num_pending += samples
        self._planned[self._step_id] = planned
        return output

    def _schedule_running(self, budget: int) -> int:
        # Under the SLO controller the budget can be just the decodes' tokens (a step that banks
        # slack): a prefill ahead of decodes in the list (a later, shorter prompt finished
        # first) leaves one token for each decode behind it, or those miss the step.
        reserve = sum(r.is_decoding for r in self.running) if self.slo else 0
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.is_decoding and reserve:
                reserve -= 1
            limit = budget if request.is_decoding else budget - reserve
            num_new = min(request.max_computable_tokens - request.num_computed_tokens, limit)
            if num_new <= 0 or self._pending_ends(request):  # a leader waiting for seats to fork
                index += 1
                continue
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self._pick_victim()
                if victim is not request and self.running.index(victim) < index:
                    index -= 1  # an earlier (already scheduled) entry leaves the list
                budget += self._preempt(victim)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted itself; running[index] is now the next request
            self._num_scheduled[request.request_id] = num_new
            budget -= num_new
            index += 1
        return budget

    def _pending_ends(self, request: Request) -> bool:
        """Whether the request's pending token ends it, so no step after it can be planned: never
        synchronously (nothing is pending at schedule time); AsyncScheduler's rule."""
        return False

    def _token_in_flight(self, request: Request) -> bool:
        """Whether a preempted request still has a token in flight (it resumes after that
        token's update): never synchronously; AsyncScheduler's rule."""
        return False

    def _schedule_waiting(self, budget: int) -> None:
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if self._token_in_flight(request):  # resume after its update
                break
            hits = self.kv.get_computed_blocks(request)
            num_hit_tokens = len(hits) * self.block_size
            num_new = request.max_computable_tokens - num_hit_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if len(self.running) >= self._max_seqs:
                freed = self._evict_lower_priority(request)
                if freed is None:
                    break
                budget += freed
                continue  # re-evaluate with the freed seat (and blocks)
            if self.kv.allocate_slots(request, num_new, hits) is None:
                freed = self._evict_lower_priority(request)
                if freed is None:
                    break
                budget += freed
                continue  # retry with the freed blocks (the lookup is repeated)
            self.waiting.pop(0)
            self.kv.record_prefix_query(request.num_tokens)
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            request.needs_full_data = True
            self.running.append(request)
            self._num_scheduled[request.request_id] = num_new
            budget -= num_new

    # ---------------------------------------------------------------- update

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        planned = self._planned.pop(scheduler_output.step_id, {})
        # where each request's chunk started (num_computed_tokens is advanced at schedule time)
        starts = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        starts.update((r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_cached_reqs)
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or planned.get(req_id, request) is not request:
                continue  # finished or aborted since the step was planned
            # A request preempted since (async scheduling) still takes its token: it is waiting
            # or swapped, and resumes from it.
            new_token_ids: list[int] = []
            token = runner_output.sampled_token_ids.get(req_id)
            finish_status = None
            if token is not None:
                assert request.num_pending > 0, req_id
                request.num_pending -= 1
                request.output_token_ids.append(token)
                new_token_ids.append(token)
                finish_status = check_stop(request, token, self.config.max_model_len)
            self.kv.cache_computed_blocks(request)
            prompt_logprobs = runner_output.prompt_logprobs.get(req_id)
            if prompt_logprobs is not None:
                prompt_logprobs = _unseen_prompt_logprobs(request, starts[req_id], prompt_logprobs)
            if new_token_ids or prompt_logprobs is not None or finish_status is not None:
                outputs.append(
                    EngineCoreOutput(
                        req_id=req_id,
                        new_token_ids=new_token_ids,
                        finish_reason=finish_status.finish_reason if finish_status else None,
                        stop_reason=request.stop_reason,
                        new_logprobs=runner_output.logprobs.get(req_id),
                        new_prompt_logprobs=prompt_logprobs,
                        num_cached_tokens=max(request.num_cached_tokens, 0),
                        first_scheduled_time=request.first_scheduled_time,
                    )
                )
            if finish_status is not None:
                self._finish(request, finish_status)
        if self.slo is not None:
            self.slo.updated(scheduler_output.step_id, busy=bool(self.running or self.waiting))
        return outputs



def _unseen_prompt_logprobs(
    request: Request, start: int, rows: LogprobsLists
) -> LogprobsLists | None:
    """Rows of a chunk starting at position `start` predict prompt tokens start+1, start+2, ...
    Drop the rows reported before (a recompute preemption computes them again)."""
    skip = max(request.num_prompt_logprob_rows - start, 0)
    if skip:
        rows = LogprobsLists(rows.token_ids[skip:], rows.logprobs[skip:], rows.ranks[skip:])
    request.num_prompt_logprob_rows = max(request.num_prompt_logprob_rows, start + skip + len(rows))
    return rows if len(rows) else None
