"""Replay a workload through an in-process LLMEngine on the wall clock and score it.

Requests are added at their arrival offsets (Poisson, or all at once) and the engine is stepped
as the server's engine loop steps it; a request's first token is the step that brings it, so
TTFT = first token - arrival and TPOT = (last token - first token) / (tokens - 1), as the
server measures them. Goodput = requests that met both objectives / (last finish - first arrival).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagedserve.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.tune.workload import Workload


@dataclass(slots=True)
class Objectives:
    ttft_s: float | None
    tpot_s: float | None

    def met(self, ttft: float | None, tpot: float | None) -> bool:
        if ttft is None:
            return False
        return (self.ttft_s is None or ttft <= self.ttft_s) and (
            self.tpot_s is None or tpot is None or tpot <= self.tpot_s
        )


@dataclass(slots=True)
class ReplayResult:
    num_requests: int
    num_met: int
    elapsed_s: float
    output_tokens: int
    ttfts: list[float]
    tpots: list[float]

    @property
    def goodput_rps(self) -> float:
        return self.num_met / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def attainment(self) -> float:
        return self.num_met / self.num_requests if self.num_requests else 0.0

    @property
    def throughput_rps(self) -> float:
        return self.num_requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))] * 1e3

    def summary(self) -> dict[str, float]:
        return {
            "goodput_rps": self.goodput_rps, "slo_attainment": self.attainment,
            "throughput_rps": self.throughput_rps, "output_tokens_per_s": self.output_tokens / self.elapsed_s,
            "ttft_p50_ms": self.percentile_ms(self.ttfts, 50), "ttft_p99_ms": self.percentile_ms(self.ttfts, 99),
            "tpot_p50_ms": self.percentile_ms(self.tpots, 50), "tpot_p99_ms": self.percentile_ms(self.tpots, 99),
        }  # fmt: skip


# Called after each finished request with (finished so far, goodput so far); True stops the replay.
Progress = Callable[[int, float], bool]


def replay(engine: object, work: Workload, arrivals: list[float], objectives: Objectives,
           progress: Progress | None = None, deadline_s: float | None = None) -> ReplayResult:  # fmt: skip
    """engine: an LLMEngine. deadline_s: stop (counting the unfinished as missed) after this long."""
    from pagedserve.engine.llm_engine import LLMEngine

    assert isinstance(engine, LLMEngine)
    n = len(work.prompts)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    arrived: dict[str, float] = {}
    met = finished = tokens = 0
    ttfts: list[float] = []
    tpots: list[float] = []
    start = time.perf_counter()
    next_index = 0
    stopped = False
    while (next_index < n or engine.has_unfinished_requests()) and not stopped:
        now = time.perf_counter() - start
        if deadline_s is not None and now > deadline_s:
            break
        while next_index < n and arrivals[next_index] <= now:
            rid = f"r{next_index}"
            params = SamplingParams(max_tokens=work.output_lens[next_index], ignore_eos=True, temperature=0.0,
                                    output_kind=RequestOutputKind.DELTA)  # fmt: skip
            klass = work.classes[next_index] if work.classes else "interactive"
            engine.add_request(rid, {"prompt_token_ids": work.prompts[next_index]}, params,
                               priority_class=klass)  # fmt: skip
            arrived[rid] = start + arrivals[next_index]
            next_index += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(0.05, arrivals[next_index] - now)))
            continue
        outputs = engine.step()
        t = time.perf_counter()
        for out in outputs:
            rid = out.request_id
            new = len(out.outputs[0].token_ids) if out.outputs else 0
            if new:
                first.setdefault(rid, t)
                last[rid] = t
                counts[rid] = counts.get(rid, 0) + new
            if out.finished:
                finished += 1
                tokens += counts.get(rid, 0)
                ttft = first[rid] - arrived[rid] if rid in first else None
                tpot = (last[rid] - first[rid]) / (counts[rid] - 1) if counts.get(rid, 0) > 1 else None
                if ttft is not None:
                    ttfts.append(ttft)
                if tpot is not None:
                    tpots.append(tpot)
                met += objectives.met(ttft, tpot)
                if progress is not None and progress(finished, met / (t - start)):
                    stopped = True
    elapsed = time.perf_counter() - start
    if engine.has_unfinished_requests():  # cut short: drain nothing, free everything
        engine.abort_request([f"r{i}" for i in range(next_index)])
        while engine.has_unfinished_requests():
            engine.step()
    return ReplayResult(n, met, elapsed, tokens, ttfts, tpots)
