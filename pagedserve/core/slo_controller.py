"""SLO controller: the running-batch cap and the per-step token budget, fed by measured steps.

Pure Python (no torch, no clock of its own): the scheduler hands it one StepSample per finished
step (its wall duration and composition) and asks it for the caps before planning the next.

    schedule():  max_num_seqs  <- controller.max_num_seqs            (feedback, every `interval`)
                 token budget  <- controller.token_budget(running)   (model, every step)
    update():    controller.observe(StepSample(duration, composition))

core/slo_scheduler.py composes the samples from the scheduler's plans and times them.

1. Running-batch cap (feedback). A decode request gets one token per step, so its TPOT (time
   per output token: the mean interval between its tokens) is the mean duration of the steps it
   lived through. The signal is the mean duration of the last `span` decode steps (the TPOT of a
   request that decoded through them: one long prefill step among short ones costs each request
   its share, not the whole step); over a moving window of the last `window` such means:
       p = percentile(means, q)
       p > target                        -> shrink: cap -= max(1, cap * shrink_frac)
       p < target * (1 - margin), cap hit -> grow:   cap *= clamp(goal / p, 1 + grow_frac, 2)
                                                     (at least +1; fast far below the goal, +25%
                                                     near it), no further than the step-time
                                                     model predicts is safe
       otherwise                          -> hold (the dead band is the hysteresis)
   After every change the window is cleared and the next decision waits for `interval` fresh
   samples measured under the new cap (half as many while the cap binds and every fresh step
   took under half the goal), so one change is judged by its own effect; a shrink also
   blocks growth for `cooldown` decisions. The cap grows only while it binds (requests waited
   for a seat), so under light load it stays where the load is.
2. Token budget (model). A step-time model t = w . [1, seqs, tokens, context/1024, prefill?] is fitted by
   exponentially weighted least squares. A step's prefill share is sized so that the running
   requests' step stays under target * (1 - margin / 2): chunked prefill never breaks the TPOT
   of the requests already decoding. Steps without decodes get the whole (adapted) token cap.
   The share is at least a feedback allowance (grown while the budget binds and TPOT is well
   under target, cut on a breach), so a model that overprices prefill cannot starve it.
   A mixed step too dear to fit the goal at all (its fixed cost: eager, no CUDA graph) spends
   slack banked by faster steps (slack_s), or the step runs its decodes alone and banks theirs:
   prefill then comes in rarer, larger chunks, and the mean step stays under the goal. A
   breach cuts the seat cap and the allowance, not the token cap (a smaller chunk makes the
   dear fixed cost no cheaper).
3. Queueing delay, for admission control: while requests wait, seats are handed out at a
   measured rate (admissions per second, EWMA); a request with n ahead waits about n / rate.
   While the cap is still ramping (it has room below the configured maximum and the last
   decision found TPOT under target * (1 - margin)), that rate is the one of a cap about to be
   raised, not the engine's capacity: `ramping` tells admission control not to shed on it.
   A seat is not a first token: a seated request's prompt waits for the prefill share of the
   steps, which the TPOT objective bounds. So the prefill throughput is measured too (prompt
   tokens per second over steps that left some of the seated requests' prompts for later: the
   rate of a saturated prefill), and a new request's prefill waits about (prompt tokens ahead of
   it) / that rate; admission control sheds on the larger of the two delays. (The H200 run of
   2026-12-03 had a TTFT P50 of 2.6 s at 80 req/s with fewer than 40 requests waiting for a seat:
   160 seated requests shared a prefill share of ~220 tokens a step.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import deque
from dataclasses import dataclass

from pagedserve.core.step_time_model import StepTimeModel


@dataclass(slots=True)
class StepSample:
    duration_s: float  # wall time the step took (its tokens' inter-token interval)
    num_seqs: int  # requests scheduled in the step
    num_decode: int  # of which decoding (1 token, past their prompt)
    num_tokens: int  # scheduled tokens in all (decode + prefill)
    context_tokens: int  # KV positions the step attends over, summed over its requests
    # per priority class (interactive, batch): requests left waiting after the step was
    # planned, and requests the step gave a seat (from the waiting queue, or swapped back in)
    num_waiting: tuple[int, int] = (0, 0)
    num_admitted: tuple[int, int] = (0, 0)
    cap_hit: bool = False  # the seat cap kept a waiting request out
    budget_hit: bool = False  # the token budget cut a prefill short
    # prompt tokens the seated requests (those newly seated by the step included) had left to
    # compute when the step was planned: more than the step's prefill tokens means the prefill
    # share, not the demand, bounded it
    prefill_backlog: int = 0


@dataclass(slots=True)
class ControllerParams:
    margin: float = 0.15  # grow only while p < target * (1 - margin)
    percentile: float = 0.9  # the moving high percentile compared with the target
    # decode steps averaged into one TPOT sample (1: every step on its own). 4, not 16: a short
    # output's TPOT is the mean of a few steps, so 16-step means hid the dear (mixed) steps that
    # set the requests' P99 (H200, 80 req/s, setpoint 0.7, one run beside the other: P99 TPOT
    # 36.4 ms at 16, 22.0 at 4; benchmarks/results/h200-2026-12-02-slo-serving-9/call4-span4/)
    span: int = 4
    window: int = 32  # TPOT samples in the moving window
    interval: int = 8  # fresh samples needed before the next decision
    grow_frac: float = 0.25  # relative growth per decision near the goal (at least +1)
    max_grow: float = 2.0  # at most this factor per decision, far below the goal
    shrink_frac: float = 0.2  # at most this relative cut per decision (at least -1)
    cooldown: int = 4  # decisions without growth after a shrink
    initial_seqs: int = 8
    min_seqs: int = 1
    min_chunk: int = 16  # prefill tokens a step may always take beside its decodes
    bank_steps: float = 2.0  # banked slack a mixed step may spend, in goals (see token_budget)
    max_defer: int = 8  # decode-only steps in a row while a prefill waits for banked slack
    forgetting: float = 0.98  # per-sample weight decay of the step-time model
    # The signal is held under setpoint x target rather than the target itself: the objective is
    # on the requests' P99, and the P90 of 16-step means lies 1.25-1.5x below it (H200, 8B model,
    # 2026-12-02: at 1 the signal held at 28 ms and the requests' P99 TPOT read 34.9-40.8 ms for
    # a 30 ms target). Measured at 80 req/s (2x the rate the plain server sustains,
    # benchmarks/results/h200-2026-12-02-slo-serving-9/): setpoint 1 gives P99 TPOT 36.7 ms and
    # goodput 36.6 req/s, 0.7 gives 25.0 ms and 41.5 req/s (the plain server 123.5 ms, 3.4);
    # two later runs of 0.7 at span 16 read 33.5 and 36.4 ms (see span).
    setpoint: float = 0.7

    @classmethod
    def from_env(cls, value: str | None = None) -> ControllerParams:
        """The defaults, with overrides from PAGEDSERVE_SLO_CONTROLLER ("setpoint=0.7,span=8";
        for experiments: benchmarks/slo_serving.py --slo-variant)."""
        text = os.environ.get(ENV_OVERRIDES, "") if value is None else value
        params = cls()
        names = sorted(f.name for f in dataclasses.fields(cls))
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, raw = item.partition("=")
            name = name.strip()
            if not sep or name not in names:
                raise ValueError(f"{ENV_OVERRIDES}: expected name=value with a name among {names}, got {item!r}")
            try:  # each field keeps its default's type (int or float)
                setattr(params, name, type(getattr(params, name))(raw))
            except ValueError:
                raise ValueError(f"{ENV_OVERRIDES}: {name} needs a number, got {raw!r}") from None
        if not 0 < params.setpoint <= 1:
            raise ValueError(f"{ENV_OVERRIDES}: setpoint must lie in (0, 1], got {params.setpoint}")
        if text.strip():
            # a warning, so that it shows at --log-level WARNING too: the run is not the default
            logger.warning("SLO controller overrides from %s: %s", ENV_OVERRIDES, text.strip())
        return params


ENV_OVERRIDES = "PAGEDSERVE_SLO_CONTROLLER"
logger = logging.getLogger(__name__)


class SloController:
    """Caps for one engine under a TPOT objective (seconds) and the configured maxima."""

    def __init__(self, tpot_target_s: float, max_num_seqs: int, max_num_batched_tokens: int,
                 params: ControllerParams | None = None) -> None:  # fmt: skip
        self.params = p = params or ControllerParams()
        self.tpot_target_s = tpot_target_s
        self.max_seqs_limit = max_num_seqs
        self.max_tokens_limit = max_num_batched_tokens
        self.max_num_seqs = max(p.min_seqs, min(max_num_seqs, p.initial_seqs))
        self.token_cap = max_num_batched_tokens
        self.model = StepTimeModel(p.forgetting)
        self.window: deque[float] = deque(maxlen=p.window)  # TPOT samples (means over `span` steps)
        self._recent: deque[float] = deque(maxlen=p.span)  # the last decode steps' durations
        self.last_budget = max_num_batched_tokens
        self.last_base_s = 0.0  # the model's time for the last budgeted step's decodes alone (mixed)
        self.num_changes = 0  # cap changes so far (grow or shrink)
        self._fresh = 0  # samples since the last decision
        self._cooldown = 0
        self._headroom = True  # the last decision found TPOT well under the target (or none yet)
        # the cap was cut since it last stopped binding: the controller has found the edge of
        # this load, so a wait is no longer a ramp's (see ramping)
        self._found_edge = False
        # prefill tokens a step with decodes may take whatever the model says, by feedback: grown
        # (as the seat cap) while the budget binds with the TPOT well under target, cut on a
        # breach. The model alone can be stuck pessimistic (a small budget gives every step the
        # same few prefill tokens, so their cost is never measured apart from a request's: the
        # H200 run of 2026-12-02 held the budget at its floor while TPOT was 18 ms).
        self.prefill_allowance = p.min_chunk
        # Seconds of TPOT slack banked by steps faster than target * (1 - margin) (decode-only
        # steps, the CUDA graph), for a mixed step too dear to fit the goal on its own: its fixed
        # cost (eager, no graph) was ~20 ms for the 8B model on an H200 (2026-12-02), so a
        # sliver of prefill every step made every step that slow; a request's TPOT is the mean
        # of its steps, so fast decode steps may pay for a rare, larger chunk.
        self.slack_s = 0.0
        self._deferred = 0  # decode-only steps in a row planned while a prefill waited for slack
        self._cap_hit = self._budget_hit = False  # within the current decision interval
        self._seats_short = False  # the last step's seat cap kept a waiting request out
        self._light = True  # the last decision found TPOT under half the pace (or none yet)
        self._seqs_seen = 0  # most requests scheduled in one step this interval
        self._decode_max_s = 0.0  # the longest of this interval's steps without prefill
        self._mean_context = 0.0  # EWMA of context tokens per decoding request
        self._mean_chunk = float(self.params.min_chunk)  # EWMA of prefill tokens per prefilling request
        # per class: admissions while that class had requests waiting, (admitted, seconds)
        # summed over the current interval, and their rate in requests per second (EWMA; None
        # while the class never waited)
        self._admit_count = [0, 0]
        self._admit_time = [0.0, 0.0]
        self.admit_rate: list[float | None] = [None, None]
        # prompt tokens computed per second over steps that left seated prompts for later (the
        # saturated prefill rate, EWMA; None before any such step), summed over the interval
        self._prefill_count = 0
        self._prefill_time = 0.0
        self.prefill_rate: float | None = None

    @property
    def aim_s(self) -> float:
        """The TPOT the controller steers by: the objective x setpoint (the margins apply below it)."""
        return self.tpot_target_s * self.params.setpoint

    # ------------------------------------------------------------------ the scheduler's calls

    def token_budget(self, num_decode: int, context_tokens: int) -> int:
        """The token budget for a step whose running requests are num_decode decodes attending
        over context_tokens positions: their tokens plus a prefill share that keeps the predicted
        step under target * (1 - margin / 2)."""
        limit = self.max_tokens_limit
        cap = min(self.token_cap, limit)
        w = self.model.weights()
        if num_decode == 0 or w is None or w[2] <= 0:
            budget = cap  # no TPOT at stake, or no model to size the prefill share by yet
        else:
            # every running request gets its token, and a prefill always makes some progress
            floor = min(limit, num_decode + self.params.min_chunk)
            goal = self.aim_s * (1 - self.params.margin / 2)
            # the decodes' step, run as a mixed one (its fixed cost w[4] included)
            base = self.model.predict(num_decode, num_decode, context_tokens, prefill=True)
            assert base is not None
            self.last_base_s = base
            # a prefill token costs w[2], its share of the w[1] of the request it belongs to
            # (chunks of about _mean_chunk tokens), and at least one more position attended
            per_token = w[2] + w[1] / max(1.0, self._mean_chunk) + w[3] / 1024
            # Under light load (no request waits for a seat, TPOT under half the pace) banked
            # slack pays for a larger chunk: a long prompt then runs in one step, as without
            # objectives. Not under load: spent there, the slack eats the headroom the seat cap
            # grows by (the load-step simulation settled at 20 seats instead of 23-32).
            spend = max(0.0, self.slack_s) if self._light and not self._seats_short else 0.0
            extra = int((goal + spend - base) / per_token)
            if extra < self.params.min_chunk:
                # too dear beside these decodes: spend banked slack on a larger chunk, or run the
                # decodes alone and bank theirs (at most max_defer steps in a row)
                extra = int((goal + self.slack_s - base) / per_token)
                if extra < self.params.min_chunk and self._deferred < self.params.max_defer:
                    self._deferred += 1
                    self.last_budget = num_decode
                    return num_decode
            self._deferred = 0
            extra = max(extra, self.prefill_allowance if self.slack_s >= 0 else 0)
            budget = max(floor, min(cap, num_decode + extra))
        self.last_budget = budget
        return budget

    def observe(self, sample: StepSample) -> None:
        p = self.params
        if sample.num_seqs == 0:
            return
        x = StepTimeModel.features(sample.num_seqs, sample.num_tokens, sample.context_tokens)
        self.model.add(x, sample.duration_s)
        for k in (0, 1):
            if sample.num_waiting[k] > 0 or sample.num_admitted[k] > 0:
                self._admit_count[k] += sample.num_admitted[k]
                self._admit_time[k] += sample.duration_s
        prefill_seqs = sample.num_seqs - sample.num_decode
        prefill_tokens = sample.num_tokens - sample.num_decode
        if sample.prefill_backlog > prefill_tokens:
            self._prefill_count += prefill_tokens
            self._prefill_time += sample.duration_s
        if prefill_seqs > 0:
            chunk = (sample.num_tokens - sample.num_decode) / prefill_seqs
            self._mean_chunk += 0.2 * (chunk - self._mean_chunk)
        self._cap_hit |= sample.cap_hit
        self._seats_short = sample.cap_hit
        self._budget_hit |= sample.budget_hit
        self._seqs_seen = max(self._seqs_seen, sample.num_seqs)
        if sample.num_decode == sample.num_tokens:
            self._decode_max_s = max(self._decode_max_s, sample.duration_s)
        if sample.num_decode == 0:
            return  # no request's TPOT was at stake
        self._mean_context += 0.1 * (sample.context_tokens / sample.num_seqs - self._mean_context)
        goal = self.aim_s * (1 - p.margin)  # the pace the bank keeps
        bank = p.bank_steps * goal
        self.slack_s = min(bank, max(-bank, self.slack_s + goal - sample.duration_s))
        self._recent.append(sample.duration_s)
        self.window.append(sum(self._recent) / len(self._recent))
        self._fresh += 1
        if self._fresh >= p.interval or self._fresh >= p.interval // 2 and self._far_below():
            self._decide()

    def _far_below(self) -> bool:
        """The cap binds while every fresh step took under half the goal: a ramp (a burst after
        light load) need not wait a full interval to grow."""
        if not self._cap_hit or self._cooldown > 0:
            return False
        goal = self.aim_s * (1 - self.params.margin)
        return max(self.window) < goal / 2

    # ------------------------------------------------------------------ decisions

    def high_percentile(self) -> float | None:
        if not self.window:
            return None
        ordered = sorted(self.window)
        index = max(0, math.ceil(self.params.percentile * len(ordered)) - 1)
        return ordered[index]

    def _decide(self) -> None:
        p = self.params
        high = self.high_percentile()
        assert high is not None
        target = self.aim_s
        before = self.max_num_seqs, self.token_cap, self.prefill_allowance
        self._headroom = high < target * (1 - p.margin)
        self._light = high < target * (1 - p.margin) / 2
        if not self._cap_hit:
            self._found_edge = False  # the cap no longer binds: the next climb is a ramp again
        if high > target:
            self.prefill_allowance = max(p.min_chunk, int(self.prefill_allowance * (1 - p.shrink_frac)))
            self._cooldown = p.cooldown
            decodes = self._decode_max_s
            if self._cap_hit or decodes >= target * (1 - p.margin) / 2:
                # cut from what actually ran, so that a cap far above the batch still bites
                base = min(self.max_num_seqs, max(self._seqs_seen, p.min_seqs))
                self.max_num_seqs = max(p.min_seqs, base - max(1, int(base * p.shrink_frac)))
                self._found_edge = True
            # else light load: no request waited for a seat and the decodes alone ran in under
            # half the pace, so the breach came from the steps' prefill; a seat cap cut below
            # the running batch would only make the next arrivals queue (the mix simulation's
            # light load: 27 running, the cap cut 48 -> 23, short prompts waited 150-300 ms)
        elif self._cooldown > 0:
            self._cooldown -= 1
        elif high < target * (1 - p.margin):
            if self._cap_hit:
                self.max_num_seqs = self._grown_seqs(target * (1 - p.margin) / max(high, 1e-9))
            if self._budget_hit:
                step = max(1, int(self.token_cap * p.grow_frac))
                self.token_cap = min(self.max_tokens_limit, self.token_cap + step)
                factor = min(p.max_grow, max(1 + p.grow_frac, target * (1 - p.margin) / max(high, 1e-9)))
                self.prefill_allowance = min(self.token_cap, int(self.prefill_allowance * factor))
        if (self.max_num_seqs, self.token_cap, self.prefill_allowance) != before:
            self.num_changes += 1
            self.window.clear()  # judge the new caps by samples measured under them
            self._recent.clear()
        self._fresh = 0
        self._cap_hit = self._budget_hit = False
        self._seqs_seen = 0
        self._decode_max_s = 0.0
        for k in (0, 1):
            if self._admit_time[k] > 0:
                rate = self._admit_count[k] / self._admit_time[k]
                old = self.admit_rate[k]
                self.admit_rate[k] = rate if old is None else 0.5 * old + 0.5 * rate
        self._admit_count, self._admit_time = [0, 0], [0.0, 0.0]
        if self._prefill_time > 0:
            rate = self._prefill_count / self._prefill_time
            old_rate = self.prefill_rate
            self.prefill_rate = rate if old_rate is None else 0.5 * old_rate + 0.5 * rate
        self._prefill_count, self._prefill_time = 0, 0.0

    def _grown_seqs(self, headroom: float) -> int:
        """cap x a bounded factor (headroom = goal / measured percentile, > 1), but no further
        than the model predicts a decode step stays under target * (1 - margin)."""
        p = self.params
        cap = self.max_num_seqs
        factor = min(p.max_grow, max(1 + p.grow_frac, headroom))
        grown = min(self.max_seqs_limit, max(cap + 1, int(cap * factor)))
        goal = self.aim_s * (1 - p.margin)
        while grown > cap + 1:
            n = grown
            predicted = self.model.predict(n, n, int(n * self._mean_context))
            if predicted is None or predicted <= goal:
                break
            grown -= 1
        return grown

    # ------------------------------------------------------------------ admission control

    @property
    def ramping(self) -> bool:
        """The seat cap is climbing to a new load: below the configured maximum, the last decision
        (if any) found TPOT under target * (1 - margin), and no cut since the cap last stopped
        binding. Requests that wait now wait for the climb, so the measured admission rate
        understates capacity. After a cut the controller has found the edge of this load: a cap
        that then oscillates below it (steps jitter more than the dead band) must not switch
        admission control off every other interval (the H200-fitted simulation at setpoint 0.65
        let its queue grow to 100 that way)."""
        return (self._headroom and self._cooldown == 0 and not self._found_edge
                and self.max_num_seqs < self.max_seqs_limit)

    def predicted_queue_delay_s(self, num_ahead: int, batch: bool = False) -> float | None:
        """Seconds a new request waits for a seat behind the num_ahead requests of its class
        queued before it (a batch request: behind the batch ones; the interactive ones that pass
        it show in the batch class's lower admission rate). None: its class never waited yet,
        so there is no rate to go by."""
        return predicted_delay(num_ahead, self.admit_rate[int(batch)])

    def predicted_prefill_delay_s(self, tokens_ahead: int) -> float | None:
        """Seconds until the prefill reaches a new request's prompt behind tokens_ahead prompt
        tokens (the seated requests' rest and the waiting ones ahead). None: no saturated step yet."""
        return predicted_delay(tokens_ahead, self.prefill_rate)


ADMISSION_SHARE = 0.8  # of the TTFT objective a predicted queueing delay may take (admission control)


def sheds(seat_delay_s: float | None, prefill_delay_s: float | None, ttft_target_s: float, ramping: bool) -> bool:
    """Admission control's rule: refuse a new request whose predicted wait for a seat or for
    the prefill passes ADMISSION_SHARE of its TTFT objective. The seat wait does not count
    while the seat cap is still ramping (the wait is the controller's own, and shrinks as the
    cap grows); a delay without a rate to predict from (None) never sheds."""
    limit = ADMISSION_SHARE * ttft_target_s
    if prefill_delay_s is not None and prefill_delay_s > limit:
        return True
    return not ramping and seat_delay_s is not None and seat_delay_s > limit


def predicted_delay(num_ahead: int, admit_rate: float | None) -> float | None:
    if num_ahead <= 0:
        return 0.0
    if admit_rate is None:
        return None
    if admit_rate <= 0:
        return math.inf  # requests of the class waited and none got a seat
    return num_ahead / admit_rate
