"""The SLO-aware scheduler against the same scheduler without objectives, simulated on a step-time
model fitted to the Llama-3-8B-shaped model on one H200, with the ShareGPT-like length mix and
Poisson arrivals: the shape of the issue's GPU comparison, deterministic and on the CPU.

Step time (ms), from the H200 runs of 2026-12-01 (benchmarks/results/h200-2026-12-01-*): about
4 ms for a decode step of one request (the CUDA graph), 0.04 ms per request scheduled, 0.03 ms per
token (16 GFLOP a token at about 550 TFLOP/s), 0.03 ms per 1024 positions attended (131 kB of KV
a position at 4.2 TB/s), and 1.5 ms more for a mixed step (eager, no graph):

    t = 4 + 0.04 * seqs + 0.03 * tokens + 0.03 * context / 1024 + 1.5 * [prefill in the step]

so a step of 8,192 prefill tokens takes about 250 ms, and a decode batch of 300 at context 400
about 26 ms: the server without objectives breaks a 30 ms TPOT when a full prefill budget lands
among running decodes, which is what the H200 run showed (ITL P99 483 ms at 72 req/s).
The 1.5 ms mixed surcharge fits large chunks, whose eager launches overlap their GPU work; the
SLO server's /metrics trace of 2026-12-02 put a small chunk's at about 20 ms (mixed_ms=20.0).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pagedserve.config import SloConfig
from pagedserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagedserve.core.request import Request
from pagedserve.core.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams
from pagedserve.tune.workload import sharegpt_like
from tests.slo.sim_load import Clock, Record, _shed, make_sim_scheduler

MIXED_MS = 1.5  # the mixed step's extra fixed cost of this docstring's fit


def h200_step_s(plan: SchedulerOutput, scheduler: Scheduler, mixed_ms: float = MIXED_MS) -> float:
    seqs = len(plan.num_scheduled_tokens)
    context = 0
    prefill = False
    for req_id, num in plan.num_scheduled_tokens.items():
        r = scheduler.requests[req_id]
        context += r.num_computed_tokens + num
        prefill |= num > 1 or r.num_computed_tokens < r.num_prompt_tokens
    ms = 4.0 + 0.04 * seqs + 0.03 * plan.total_num_scheduled_tokens + 0.03 * context / 1024 + mixed_ms * prefill
    return ms / 1e3


class CountingWorker:
    """Tracks lengths only (no KV contents): each request that reaches the end of its tokens
    samples one (token id 7)."""

    def __init__(self) -> None:
        self.length: dict[str, int] = {}
        self.computed: dict[str, int] = {}

    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in plan.finished_req_ids:
            self.length.pop(req_id, None)
            self.computed.pop(req_id, None)
        for new in plan.scheduled_new_reqs:
            self.length[new.req_id] = len(new.prompt_token_ids) + len(new.output_token_ids)
            self.computed[new.req_id] = new.num_computed_tokens
        for cached in plan.scheduled_cached_reqs:
            self.computed[cached.req_id] = cached.num_computed_tokens
        sampled: dict[str, int] = {}
        for req_id, num in plan.num_scheduled_tokens.items():
            self.computed[req_id] += num
            if self.computed[req_id] == self.length[req_id]:
                sampled[req_id] = 7
                self.length[req_id] += 1
        return ModelRunnerOutput(sampled_token_ids=sampled)


@dataclass
class MixResult:
    records: dict[str, Record]
    shed: int
    duration_s: float  # arrivals' span

    def admitted(self) -> list[Record]:
        return list(self.records.values())

    def goodput_rps(self, slo: SloConfig) -> float:
        ttft, tpot = slo.ttft_s["interactive"], slo.tpot_s["interactive"]
        met = sum(1 for r in self.records.values()
                  if r.ttft is not None and r.ttft <= ttft and (r.tpot is None or r.tpot <= tpot))  # fmt: skip
        end = max((r.last_token or r.arrival) for r in self.records.values())
        return met / end

    def p99(self, key: str) -> float:
        values = sorted(v for r in self.records.values() if (v := getattr(r, key)) is not None)
        return values[min(len(values) - 1, int(0.99 * len(values)))]


def simulate_mix(rate_rps: float, num_requests: int, slo: SloConfig | None, *, objectives: bool,
                 max_num_seqs: int = 1024, max_num_batched_tokens: int = 8192, seed: int = 0,
                 jitter: float = 0.0, mixed_ms: float = MIXED_MS) -> MixResult:  # fmt: skip
    """num_requests of the ShareGPT-like mix arriving as a Poisson process at rate_rps, served by
    the server's H200 defaults (1024 seats, 8,192 tokens a step); objectives: the SLO controller
    and admission control on (slo given), else neither (the server without objectives).
    jitter: each step's time is multiplied by a seeded lognormal factor of this sigma (a real
    engine's steps vary: host work, allocator, Python), so single steps scatter around the mean.
    mixed_ms: the mixed step's extra fixed cost (the H200 server's /metrics trace of 2026-12-02
    put it near 20 ms: 26 decodes beside 15 prefill tokens took ~28 ms, 24 decodes alone 6.6)."""
    rng = random.Random(seed)
    noise = random.Random(seed + 1)
    work = sharegpt_like(1000, num_requests)
    clock = Clock()
    scheduler = make_sim_scheduler(slo if objectives else None, clock, max_num_seqs, max_num_batched_tokens,
                                   max_model_len=4096, num_gpu_blocks=52_000)  # fmt: skip
    worker = CountingWorker()
    arrivals, t = [], 0.0
    for _ in range(num_requests):
        arrivals.append(t)
        t += rng.expovariate(rate_rps)
    result = MixResult({}, 0, arrivals[-1])
    nxt = 0
    while nxt < len(arrivals) or scheduler.has_unfinished_requests():
        while nxt < len(arrivals) and arrivals[nxt] <= clock.now:
            i = nxt
            nxt += 1
            if objectives and slo is not None and _shed(scheduler, slo, "interactive"):
                result.shed += 1
                continue
            prompt = work.prompts[i]
            scheduler.add_request(Request(
                f"r{i}", prompt, SamplingParams(max_tokens=work.output_lens[i], ignore_eos=True),
                eos_token_id=None, arrival_time=arrivals[i]))  # fmt: skip
            result.records[f"r{i}"] = Record(arrivals[i], "interactive")
        if not scheduler.has_unfinished_requests():
            clock.now = arrivals[nxt]
            continue
        plan = scheduler.schedule()
        duration = h200_step_s(plan, scheduler, mixed_ms)
        if jitter:
            duration *= noise.lognormvariate(-jitter * jitter / 2, jitter)  # mean 1
        out = worker.execute(plan)
        clock.now += duration
        for o in scheduler.update_from_output(plan, out):
            result.records[o.req_id].took(clock.now, len(o.new_token_ids))
    return result
