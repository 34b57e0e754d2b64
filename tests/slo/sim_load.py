"""A deterministic load simulation of the scheduler + SLO controller: no model, no wall clock.

Time is simulated: every step lasts what StepTimeModel says for the plan's composition, and
requests arrive at fixed (deterministic) gaps per load phase. SimWorker (tests/core/sim.py)
executes each plan, so block tables stay checked while the controller works.

The step-time model (milliseconds), a GPU-like shape: a fixed cost, a per-request cost, a
per-token cost and an attention cost per 1024 positions attended:

    t = 2.0 + 0.5 * seqs + 0.02 * tokens + 0.5 * context / 1024
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pagedserve.config import CacheConfig, SchedulerConfig, SloConfig
from pagedserve.core.outputs import SchedulerOutput
from pagedserve.core.request import Request
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.slo_controller import sheds
from pagedserve.sampling_params import SamplingParams
from tests.core.sim import SimWorker


def step_time_s(plan: SchedulerOutput, scheduler: Scheduler) -> float:
    context = 0
    for req_id, num in plan.num_scheduled_tokens.items():
        context += scheduler.requests[req_id].num_computed_tokens + num
    ms = 2.0 + 0.5 * len(plan.num_scheduled_tokens) + 0.02 * plan.total_num_scheduled_tokens + 0.5 * context / 1024
    return ms / 1e3


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Phase:
    duration_s: float
    rate_rps: float


@dataclass
class Record:
    arrival: float
    klass: str
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0
    first_step: int = -1  # the step that first scheduled it

    def took(self, now: float, num_new: int) -> None:
        """num_new tokens of this request came out of the step that ended at `now`."""
        if num_new:
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
            self.num_tokens += num_new

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.last_token is None or self.num_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.num_tokens - 1)


@dataclass
class SimResult:
    records: dict[str, Record]
    rejected: list[tuple[float, str]]
    caps: list[int] = field(default_factory=list)  # the seat cap at every step
    budgets: list[int] = field(default_factory=list)
    step_starts: list[float] = field(default_factory=list)
    load_step_index: int = 0  # first step of the second phase


def make_sim_scheduler(slo: SloConfig | None, clock: Clock, max_num_seqs: int = 256,
                       max_num_batched_tokens: int = 2048, max_model_len: int = 1024,
                       num_gpu_blocks: int = 4096) -> Scheduler:  # fmt: skip
    cache = CacheConfig(block_size=16, gpu_memory_utilization=0.9, swap_space_bytes=0,
                        enable_prefix_caching=False, kv_cache_memory_bytes=None,
                        num_gpu_blocks_override=None, num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=0)  # fmt: skip
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len, enable_chunked_prefill=True, preemption_mode="recompute",
                             policy="fcfs", slo=slo)  # fmt: skip
    scheduler = Scheduler(config, cache)
    if scheduler.slo is not None:
        scheduler.slo.clock = clock
    return scheduler


def simulate(phases: list[Phase], slo: SloConfig | None, admission: bool, seed: int = 0,
             prompt_len: tuple[int, int] = (64, 192), output_len: tuple[int, int] = (48, 80),
             batch_share: float = 0.0, max_num_seqs: int = 256) -> SimResult:  # fmt: skip
    """Run the phases back to back. admission: shed an arrival whose predicted queueing delay
    passes its class's TTFT objective (as the server does, with 429)."""
    rng = random.Random(seed)
    clock = Clock()
    scheduler = make_sim_scheduler(slo, clock, max_num_seqs)
    worker = SimWorker(16)
    arrivals: list[tuple[float, str]] = []
    start = 0.0
    for phase in phases:
        gap = 1.0 / phase.rate_rps
        t = start
        while t < start + phase.duration_s:
            arrivals.append((t, "batch" if rng.random() < batch_share else "interactive"))
            t += gap
        start += phase.duration_s
    second_phase_at = phases[0].duration_s
    result = SimResult({}, [])
    next_arrival = 0
    step_index = 0
    end = sum(p.duration_s for p in phases)
    while clock.now < end or scheduler.has_unfinished_requests():
        while next_arrival < len(arrivals) and arrivals[next_arrival][0] <= clock.now:
            at, klass = arrivals[next_arrival]
            req_id = f"r{next_arrival}"
            next_arrival += 1
            if admission and slo is not None and _shed(scheduler, slo, klass):
                result.rejected.append((at, klass))
                continue
            request = Request(
                req_id, [rng.randrange(1, 1000) for _ in range(rng.randint(*prompt_len))],
                SamplingParams(max_tokens=rng.randint(*output_len), ignore_eos=True),
                eos_token_id=None, arrival_time=at, priority_class=klass,
            )  # fmt: skip
            scheduler.add_request(request)
            result.records[req_id] = Record(at, klass)
        if not scheduler.has_unfinished_requests():
            if next_arrival >= len(arrivals):
                break
            clock.now = arrivals[next_arrival][0]
            continue
        if not result.load_step_index and clock.now >= second_phase_at:
            result.load_step_index = step_index
        plan = scheduler.schedule()
        result.caps.append(scheduler._max_seqs)
        result.budgets.append(scheduler.slo.controller.last_budget if scheduler.slo else 0)
        result.step_starts.append(clock.now)
        for new in plan.scheduled_new_reqs:
            record = result.records[new.req_id]
            if record.first_step < 0:
                record.first_step, record.first_scheduled = step_index, clock.now
        duration = step_time_s(plan, scheduler)
        runner_output = worker.execute(plan)
        clock.now += duration
        for out in scheduler.update_from_output(plan, runner_output):
            result.records[out.req_id].took(clock.now, len(out.new_token_ids))
        step_index += 1
    return result


def _shed(scheduler: Scheduler, slo: SloConfig, klass: str) -> bool:
    """The server's admission rule (entrypoints/openai/slo_admission.py) on the scheduler's own
    numbers: requests of its class ahead of a new one / the class's measured admission rate, and
    prompt tokens ahead of it / the measured prefill rate."""
    target = slo.ttft_s.get(klass)
    if target is None or scheduler.slo is None:
        return False
    batch = klass == "batch"
    ahead = scheduler.num_waiting_ahead(klass)
    tokens = scheduler.slo.prefill_ahead(scheduler.running, scheduler.waiting)[int(batch)]
    controller = scheduler.slo.controller
    return sheds(controller.predicted_queue_delay_s(ahead, batch=batch), controller.predicted_prefill_delay_s(tokens),
                 target, controller.ramping)  # fmt: skip
