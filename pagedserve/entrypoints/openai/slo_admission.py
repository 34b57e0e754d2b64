"""SLO admission control and SLO metrics on the HTTP side.

Admission: a new request of priority class c queues behind the requests of its class waiting in
the engine; seats go to that class at a rate the engine's SLO controller measures (admissions
per second while the class waits; batch requests see a lower rate, as interactive ones pass
them). Its predicted queueing delay is

    ahead_c / rate_c,  ahead_c = waiting of class c at the last engine report
                                 + requests of class c this process sent since that report

and its predicted wait for the prefill (a seat is not a first token: the TPOT objective bounds
the prefill share of each step) is

    tokens_c / prefill_rate,  tokens_c = prompt tokens ahead at the last report (the seated
                                         requests' rest, the waiting ones it does not pass)
                                         + requests sent since x the mean seated prompt

Past ADMISSION_SHARE of the class's TTFT objective (the rest is left for its own prefill and
for the rates' error) either one refuses the request with 429 (the seat wait not while the
controller's seat cap is still ramping up: that wait shrinks as the cap grows), `Retry-After`
(seconds for the queue to drain to the objective at that rate) and an OpenAI error JSON: the
queue stays bounded instead of every request's TTFT growing with it.

Metrics: every finished request counts toward its class's attainment (TTFT, TPOT, both) and,
when it met both, goodput; each engine report sets the controller's caps and the delays.
"""

from __future__ import annotations

import math
from typing import Any

from pagedserve.config import PRIORITY_CLASSES, SloConfig
from pagedserve.core.slo_controller import ADMISSION_SHARE, predicted_delay, sheds
from pagedserve.core.stats import SchedulerStats
from pagedserve.engine.async_llm import FinishedRequestStats
from pagedserve.entrypoints.openai.errors import BadRequestError, overloaded
from pagedserve.ops.metrics import SloMetrics


class SloAdmission:
    def __init__(self, slo: SloConfig | None, metrics: SloMetrics) -> None:
        self.slo = slo
        self.metrics = metrics
        self.last: SchedulerStats | None = None
        self._sent_since = dict.fromkeys(PRIORITY_CLASSES, 0)

    # ------------------------------------------------------------------ engine listeners

    def on_stats(self, stats: SchedulerStats) -> None:
        self.last = stats
        self._sent_since = dict.fromkeys(PRIORITY_CLASSES, 0)
        if self.slo is None:
            return
        if stats.slo_max_num_seqs:
            self.metrics.max_num_seqs.set(stats.slo_max_num_seqs)
            self.metrics.max_num_batched_tokens.set(stats.slo_token_budget)
            self.metrics.tpot_signal.set(stats.slo_tpot_signal_s)
            self.metrics.mixed_step_model.set(stats.slo_mixed_step_model_s)
            self.metrics.prefill_allowance.set(stats.slo_prefill_allowance)
        for klass in PRIORITY_CLASSES:
            known = [d for d in self.predicted_delays_s(klass) if d is not None]
            self.metrics.queue_delay[klass].set(min(max(known), 1e9) if known else -1.0)

    def on_finished(self, f: FinishedRequestStats) -> None:
        if f.finished_reason == "abort" or self.slo is None:
            return  # a cut request met or missed nothing
        ttft_target = self.slo.ttft_s.get(f.priority_class)
        tpot_target = self.slo.tpot_s.get(f.priority_class)
        ttft_met = ttft_target is None or (f.ttft is not None and f.ttft <= ttft_target)
        tpot_met = tpot_target is None or f.tpot is None or f.tpot <= tpot_target
        self.metrics.record_finished(f.priority_class, ttft_met, tpot_met)

    # ------------------------------------------------------------------ admission

    def num_ahead(self, klass: str) -> int:
        s = self.last
        waiting = 0
        if s is not None:
            waiting = s.num_waiting_batch if klass == "batch" else max(0, s.num_waiting - s.num_waiting_batch)
        return waiting + self._sent_since[klass]

    def prefill_ahead(self, klass: str) -> int:
        s = self.last
        if s is None:
            return 0
        reported = s.prefill_ahead_batch if klass == "batch" else s.prefill_ahead_interactive
        return reported + int(self._sent_since[klass] * s.slo_mean_prompt_tokens)

    def predicted_delays_s(self, klass: str) -> tuple[float | None, float | None]:
        """(wait for a seat, wait for the prefill) of a new request of the class; None: no rate yet."""
        s = self.last
        if s is None:
            return None, None
        rate = s.admit_rate_batch if klass == "batch" else s.admit_rate_interactive
        return predicted_delay(self.num_ahead(klass), rate), predicted_delay(self.prefill_ahead(klass), s.slo_prefill_rate)

    def check(self, num_new: int, klass: str) -> None:
        """Raise the 429 when the class's predicted wait for a seat or for the prefill passes its
        TTFT objective's share; else count the request as sent."""
        target = self.slo.ttft_s.get(klass) if self.slo is not None else None
        s = self.last
        if target is not None and s is not None:
            seat, prefill = self.predicted_delays_s(klass)
            if sheds(seat, prefill, target, ramping=s.slo_ramping):
                self.metrics.rejected[klass].inc(num_new)
                allowed = ADMISSION_SHARE * target
                # time for each queue to drain to what the objective allows at its measured rate
                drains = [0.0]
                if prefill is not None and prefill > allowed:
                    drains.append(prefill - allowed)
                if not s.slo_ramping and seat is not None and seat > allowed:
                    drains.append(seat - allowed)  # inf when the class waited and got no seat
                drain = max(drains)
                retry = 60 if not math.isfinite(drain) else min(60, max(1, math.ceil(drain)))
                delay = max(d for d in (seat, prefill) if d is not None)
                shown = "unbounded" if not math.isfinite(delay) else f"{delay * 1e3:.0f} ms"
                raise overloaded(
                    f"The predicted queueing delay for a {klass} request ({shown}) is beyond the server's "
                    f"time-to-first-token objective ({target * 1e3:.0f} ms); retry later.",
                    retry_after_s=retry,
                )
        self._sent_since[klass] += num_new


def priority_class_of(raw: Any, requested: str | None) -> str:
    """The request's priority class: the tenant's when authentication gives one (issue 16's
    tenant policy, on the principal or the request state), which a request may only lower to
    "batch"; otherwise the request's `priority_class` field; else "interactive"."""
    tenant_class = getattr(getattr(raw.state, "principal", None), "priority_class", None)
    tenant_class = tenant_class or getattr(raw.state, "priority_class", None)
    if requested is not None and requested not in PRIORITY_CLASSES:
        raise BadRequestError(f"priority_class must be one of {', '.join(PRIORITY_CLASSES)}", "priority_class")
    if tenant_class in PRIORITY_CLASSES:
        return "batch" if requested == "batch" else str(tenant_class)
    return requested or "interactive"
