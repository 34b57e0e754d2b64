"""The scheduler's side of the SLO controller (core/slo_controller.py): the caps for each step
it plans, and a StepSample of each step it updates, timed with the engine's clock (time.monotonic;
a simulated one in tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pagedserve.core.slo_controller import ControllerParams, SloController, StepSample

if TYPE_CHECKING:
    from pagedserve.config import SloConfig
    from pagedserve.core.outputs import SchedulerOutput
    from pagedserve.core.request import Request
    from pagedserve.core.stats import SchedulerStats


class SchedulerSlo:
    """The scheduler's side of the controller: composes each planned step's StepSample and times
    it with the given clock (the engine's time.monotonic; a simulated one in tests).

    A step's duration runs from the previous step's update (when requests were left running, so
    the engine loop went straight on: its output handling belongs to this interval), else from
    its own planning, to its own update. Under async scheduling (step n+1 planned before step n's
    update) this is still the interval between two tokens of a decoding request."""

    def __init__(self, slo: SloConfig, max_num_seqs: int, max_num_batched_tokens: int,
                 clock: Callable[[], float], params: ControllerParams | None = None,
                 chunked_prefill: bool = True) -> None:  # fmt: skip
        tightest = slo.tightest_tpot_s
        assert tightest is not None, "the controller needs a TPOT objective"
        self.slo = slo
        self.controller = SloController(tightest, max_num_seqs, max_num_batched_tokens,
                                        params or ControllerParams.from_env())
        self.clock = clock
        self.chunked_prefill = chunked_prefill
        self._planned: dict[int, tuple[float, StepSample]] = {}
        # EWMA of the prompt lengths of newly seated requests: what a request sent since the
        # last report adds to the prefill ahead of the next one (admission control)
        self.mean_prompt_tokens = 0.0
        self._last_update: float | None = None

    def target_for(self, running: Iterable[Request]) -> float:
        """The TPOT objective the running batch must meet: the interactive one while an
        interactive request runs, else the batch class's (else the tightest)."""
        tpot = self.slo.tpot_s
        classes = {r.priority_class for r in running}
        for cls in ("interactive", "batch"):
            if cls in classes and cls in tpot:
                return tpot[cls]
        tightest = self.slo.tightest_tpot_s
        assert tightest is not None
        return tightest

    def caps(self, running: list[Request]) -> tuple[int, int]:
        """(running-batch cap, token budget) for the step about to be planned."""
        c = self.controller
        if not running and not self.chunked_prefill:
            # Without chunking a prompt runs whole, so an idle engine takes any prompt the
            # configuration admits: one longer than the adapted cap would wait forever (no step
            # runs, so nothing would grow the cap back).
            c.last_budget = c.max_tokens_limit
            return c.max_num_seqs, c.max_tokens_limit
        c.tpot_target_s = self.target_for(running)
        num_decode = context = 0
        for r in running:
            if r.is_decoding:
                num_decode += 1
                context += r.num_computed_tokens
        return c.max_num_seqs, c.token_budget(num_decode, context)

    def planned(self, plan: SchedulerOutput, requests: dict[str, Request], num_waiting: tuple[int, int],
                max_seqs: int, budget: int, running: list[Request]) -> None:  # fmt: skip
        """Call before schedule() advances num_computed_tokens past the plan."""
        num_decode = context = 0
        for req_id, num in plan.num_scheduled_tokens.items():
            r = requests[req_id]
            context += r.num_computed_tokens + num
            num_decode += num == 1 and r.is_decoding
        admitted = [0, 0]
        for new in plan.scheduled_new_reqs:
            admitted[requests[new.req_id].priority_class == "batch"] += 1
            prompt = len(new.prompt_token_ids)
            self.mean_prompt_tokens += (0.05 if self.mean_prompt_tokens else 1.0) * (prompt - self.mean_prompt_tokens)
        num_running = len(running)
        sample = StepSample(
            duration_s=0.0, num_seqs=len(plan.num_scheduled_tokens), num_decode=num_decode,
            num_tokens=plan.total_num_scheduled_tokens, context_tokens=context, num_waiting=num_waiting,
            num_admitted=(admitted[0], admitted[1]), cap_hit=sum(num_waiting) > 0 and num_running >= max_seqs,
            budget_hit=plan.total_num_scheduled_tokens >= budget,
            prefill_backlog=sum(r.num_prefill_left for r in running),
        )  # fmt: skip
        self._planned[plan.step_id] = (self.clock(), sample)

    def fill_stats(self, stats: SchedulerStats, running: list[Request], waiting: list[Request]) -> None:
        """The controller's fields of the step's SchedulerStats (running, waiting: the queues now)."""
        c = self.controller
        stats.prefill_ahead_interactive, stats.prefill_ahead_batch = self.prefill_ahead(running, waiting)
        stats.slo_prefill_rate = c.prefill_rate
        stats.slo_mean_prompt_tokens = self.mean_prompt_tokens
        stats.slo_max_num_seqs, stats.slo_token_budget = c.max_num_seqs, c.last_budget
        stats.admit_rate_interactive, stats.admit_rate_batch = c.admit_rate[0], c.admit_rate[1]
        stats.slo_ramping = c.ramping
        stats.slo_tpot_signal_s = c.high_percentile() or 0.0
        stats.slo_mixed_step_model_s = c.last_base_s
        stats.slo_prefill_allowance = c.prefill_allowance

    @staticmethod
    def prefill_ahead(running: list[Request], waiting: list[Request]) -> tuple[int, int]:
        """(interactive, batch): prompt tokens a new request of the class queues behind for its
        prefill: the seated requests' rest, and the waiting requests it does not pass
        (interactive ones pass waiting batch ones; a batch one queues behind them all)."""
        seated = sum(r.num_prefill_left for r in running)
        waiting_batch = sum(r.num_prefill_left for r in waiting if r.priority_class == "batch")
        waiting_all = sum(r.num_prefill_left for r in waiting)
        return seated + waiting_all - waiting_batch, seated + waiting_all

    def updated(self, step_id: int, busy: bool) -> None:
        """busy: requests are left to run, so the engine plans the next step at once (the time
        until then, spent on the step's outputs, is part of the next inter-token interval)."""
        entry = self._planned.pop(step_id, None)
        if entry is None:
            return
        now = self.clock()
        planned_at, sample = entry
        # sync: the previous update came before this plan; async: after it (planned ahead)
        start = planned_at if self._last_update is None else self._last_update
        self._last_update = now if busy else None
        sample.duration_s = max(0.0, now - start)
        self.controller.observe(sample)
