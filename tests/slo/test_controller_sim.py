"""The SLO controller against a simulated, deterministic step-time model (tests/slo/sim_load.py):
no model and no wall clock, so every number here is exactly reproducible."""

from __future__ import annotations

import statistics

import pytest

from pagedserve.config import SloConfig
from pagedserve.core.slo_controller import ControllerParams, SloController, StepSample
from pagedserve.core.step_time_model import StepTimeModel
from tests.slo.sim_load import Phase, SimResult, simulate

TPOT = 0.030
SLO = SloConfig(ttft_s={"interactive": 1.0, "batch": 5.0}, tpot_s={"interactive": TPOT, "batch": TPOT})
# Under the step-time model a decode-only step of n requests (context ~130 each) takes about
# 2 + 0.583 n ms: n = 48 is the largest batch whose TPOT meets 30 ms. At that batch and 64-token
# outputs the server completes about 48 / (0.030 * 64) = 25 requests/s: the capacity.
CAPACITY_RPS = 25.0
# The controller steers by setpoint x target (core/slo_controller.py), so the largest batch it
# settles on is the one whose decode step meets that aim.
AIM = TPOT * ControllerParams().setpoint
AIM_SEQS = int((AIM - 0.002) / 0.000583)
LIGHT, HEAVY = Phase(4, 0.3 * CAPACITY_RPS), Phase(12, 2 * CAPACITY_RPS)
SETTLE_STEPS = 300  # the bound: requests first scheduled this many steps after the load step meet the TPOT


@pytest.fixture(scope="module")
def load_step() -> SimResult:
    return simulate([LIGHT, HEAVY], SLO, admission=True)


def _changes(caps: list[int]) -> list[int]:
    return [i for i in range(1, len(caps)) if caps[i] != caps[i - 1]]


def test_caps_grow_under_the_load_step_then_settle(load_step: SimResult) -> None:
    caps, k = load_step.caps, load_step.load_step_index
    light_max, final = max(caps[:k]), caps[-1]
    # light load: the cap never binds, so it stays at its start
    assert light_max == ControllerParams().initial_seqs
    # 2x capacity: it grows to most of what the step-time model allows under the aim, never past it
    assert 0.7 * AIM_SEQS <= final <= AIM_SEQS, caps[k:]
    changes = _changes(caps)
    assert all(i > k for i in changes), "the cap moved under light load"
    # every change is bounded (at most x2 a decision, never a jump to the maximum)
    for i in changes:
        assert caps[i] <= caps[i - 1] * ControllerParams().max_grow
    assert changes[-1] - k < SETTLE_STEPS, "took too long to settle"
    assert len(caps) - changes[-1] > 0.5 * (len(caps) - k), "still moving in the second half"


def test_tpot_of_admitted_requests_meets_the_target_after_a_bounded_number_of_steps(load_step: SimResult) -> None:
    k = load_step.load_step_index
    late = [r.tpot for r in load_step.records.values() if r.first_step >= k + SETTLE_STEPS and r.tpot is not None]
    assert len(late) > 50
    assert max(late) < TPOT
    # the same load without objectives breaks it (the static cap of 256 admits everything)
    static = simulate([LIGHT, HEAVY], None, admission=False)
    static_late = [r.tpot for r in static.records.values()
                   if r.arrival >= LIGHT.duration_s + HEAVY.duration_s / 2 and r.tpot is not None]  # fmt: skip
    assert statistics.median(static_late) > TPOT


def test_no_oscillation_under_steady_load() -> None:
    """1.5x capacity from the start, lengths drawn over a wide range: after the climb the cap stays put."""
    result = simulate([Phase(30, 1.5 * CAPACITY_RPS)], SLO, admission=True,
                      prompt_len=(16, 400), output_len=(16, 160), seed=3)  # fmt: skip
    caps = result.caps
    changes = _changes(caps)
    second_half = [i for i in changes if i >= len(caps) // 2]
    assert len(second_half) <= 1, [(i, caps[i]) for i in changes]
    # no reversal: the direction of change flips at most once over the whole run
    deltas = [caps[i] - caps[i - 1] for i in changes]
    flips = sum(1 for a, b in zip(deltas, deltas[1:]) if (a > 0) != (b > 0))
    assert flips <= 1, deltas


def test_admission_control_bounds_ttft_where_queueing_does_not(load_step: SimResult) -> None:
    heavy = [r.ttft for r in load_step.records.values() if r.arrival >= LIGHT.duration_s and r.ttft is not None]
    assert load_step.rejected, "nothing was shed at 2x capacity"
    assert max(heavy) < 2 * SLO.ttft_s["interactive"]
    unshed = simulate([LIGHT, HEAVY], SLO, admission=False)
    late = [r.ttft for r in unshed.records.values() if r.arrival >= LIGHT.duration_s + 0.75 * HEAVY.duration_s]
    early = [r.ttft for r in unshed.records.values()
             if LIGHT.duration_s <= r.arrival < LIGHT.duration_s + 0.25 * HEAVY.duration_s]  # fmt: skip
    assert min(x for x in late if x is not None) > 5 * SLO.ttft_s["interactive"]
    assert statistics.mean(x for x in late if x is not None) > 3 * statistics.mean(x for x in early if x is not None)


def test_batch_class_yields_to_interactive() -> None:
    result = simulate([LIGHT, HEAVY], SLO, admission=True, batch_share=0.5)
    by_class: dict[str, list[float]] = {"interactive": [], "batch": []}
    for r in result.records.values():
        if r.arrival >= LIGHT.duration_s and r.ttft is not None:
            by_class[r.klass].append(r.ttft)
    shed = {c: sum(1 for _, k in result.rejected if k == c) for c in by_class}
    assert statistics.mean(by_class["interactive"]) < statistics.mean(by_class["batch"])
    assert max(by_class["interactive"]) < 2 * SLO.ttft_s["interactive"]
    assert shed["batch"] > shed["interactive"]


# ---------------------------------------------------------------------------- units


def test_step_time_model_recovers_a_linear_cost_exactly() -> None:
    model = StepTimeModel(forgetting=0.98)
    truth = (0.002, 0.0005, 0.00002, 0.0004)
    for i in range(40):
        seqs, tokens, context = 1 + i % 7, 1 + (i * 37) % 300, (i * 911) % 5000
        x = StepTimeModel.features(seqs, tokens, context)
        model.add(x, sum(w * v for w, v in zip(truth, x)))
    w = model.weights()
    assert w is not None
    for got, want in zip(w, truth):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_prefill_share_keeps_the_predicted_step_under_the_target() -> None:
    # Setpoint 1, so that the 30-decode step (about 32 ms of decodes alone at 0.7 x 30 ms = 21 ms
    # would leave no prefill room) still has some: the arithmetic below is the target's own.
    c = SloController(TPOT, max_num_seqs=256, max_num_batched_tokens=8192, params=ControllerParams(setpoint=1.0))
    truth = (0.002, 0.0005, 0.00002, 0.0004)
    for i in range(40):
        seqs, tokens, context = 1 + i % 7, 1 + (i * 37) % 300, (i * 911) % 5000
        x = StepTimeModel.features(seqs, tokens, context)
        c.model.add(x, sum(w * v for w, v in zip(truth, x)))
    for num_decode in (1, 10, 30):
        budget = c.token_budget(num_decode, num_decode * 500)
        assert budget > num_decode
        prefill = budget - num_decode
        seqs = num_decode + max(1, round(prefill / c._mean_chunk))
        t = truth[0] + truth[1] * seqs + truth[2] * budget + truth[3] * (num_decode * 500 + prefill) / 1024
        assert t <= TPOT * (1 - c.params.margin / 2) * 1.01, (num_decode, budget, t)
    assert c.token_budget(0, 0) == 8192  # nothing decoding: no TPOT to protect


def _feed(c: SloController, duration: float, n: int, cap_hit: bool = True) -> None:
    for _ in range(n):
        c.observe(StepSample(duration, c.max_num_seqs, c.max_num_seqs, c.max_num_seqs, 100 * c.max_num_seqs,
                             num_waiting=(1, 0), cap_hit=cap_hit))  # fmt: skip


def test_dead_band_holds_and_a_breach_shrinks_with_a_cooldown() -> None:
    c = SloController(TPOT, max_num_seqs=256, max_num_batched_tokens=2048)
    aim = c.aim_s  # setpoint x target: the durations below are fractions of it
    start = c.max_num_seqs
    _feed(c, 0.8 * aim, c.params.interval)  # just under the goal (0.85 x aim): +25%
    assert c.max_num_seqs == start + max(1, int(start * c.params.grow_frac))
    start = c.max_num_seqs
    _feed(c, aim / 3, c.params.interval // 2)  # far under (< half the goal): x2, after half an interval
    assert c.max_num_seqs == int(start * c.params.max_grow)
    grown = c.max_num_seqs
    _feed(c, 0.93 * aim, 10 * c.params.interval)  # in the dead band [0.85, 1] x aim: holds
    assert c.max_num_seqs == grown
    _feed(c, 1.17 * aim, c.params.interval)  # over: one bounded cut
    assert c.max_num_seqs == grown - max(1, int(grown * c.params.shrink_frac))
    shrunk = c.max_num_seqs
    _feed(c, aim / 3, c.params.cooldown * c.params.interval)  # cooldown: no growth yet
    assert c.max_num_seqs == shrunk
    _feed(c, aim / 3, c.params.interval)
    assert c.max_num_seqs > shrunk
    _feed(c, aim / 3, 5 * c.params.interval, cap_hit=False)  # not binding: no growth
    held = c.max_num_seqs
    _feed(c, aim / 3, 5 * c.params.interval, cap_hit=False)
    assert c.max_num_seqs == held


def test_the_cap_ramps_until_it_holds_shrinks_or_reaches_the_maximum() -> None:
    """`ramping` (admission control does not shed on it): true while the cap climbs to a new load."""
    c = SloController(TPOT, max_num_seqs=256, max_num_batched_tokens=2048)
    assert c.ramping  # fresh: below the maximum, nothing measured against it yet
    _feed(c, 0.010, c.params.interval)  # far under the goal: grows, still ramping
    assert c.max_num_seqs > c.params.initial_seqs and c.ramping
    _feed(c, 0.028, c.params.interval)  # the dead band: holds, the ramp is over
    assert not c.ramping
    _feed(c, 0.035, c.params.interval)  # a breach: shrinks, and cools down
    assert not c.ramping
    for _ in range(c.params.cooldown - 1):
        _feed(c, 0.010, c.params.interval)
        assert not c.ramping
    shrunk = c.max_num_seqs
    _feed(c, 0.010, c.params.interval)  # the cooldown's last decision, far under
    # the controller found this load's edge: growing back under it is no ramp (a cap that
    # oscillates there must not switch shedding off every other interval)
    assert not c.ramping and c.max_num_seqs == shrunk
    _feed(c, 0.010, c.params.interval)
    assert c.max_num_seqs > shrunk and not c.ramping
    _feed(c, 0.010, c.params.interval, cap_hit=False)  # the load fell: the cap stopped binding
    assert c.ramping  # the next climb is a ramp again
    for _ in range(20):
        _feed(c, 0.010, c.params.interval)
    assert c.max_num_seqs == 256 and not c.ramping  # at the configured maximum: nothing to wait for


class _DearPrefillModel(StepTimeModel):
    """A step-time model stuck with a prefill token 7x too dear (0.21 ms against 0.03), as an
    unexcited model can stay: every step carries the same few prefill tokens, so their cost is
    never measured apart from a request's. It learns nothing more."""

    def add(self, x: list[float], y: float) -> None:
        pass

    def weights(self) -> list[float] | None:
        return [0.0055, 0.00004, 0.00021, 0.00003, 0.0]


def _true_step_s(num_decode: int, num_tokens: int) -> float:
    """ms: 5.5 fixed + 0.04 a request + 0.03 a token + 0.03 per 1,024 positions (context 300)."""
    return (5.5 + 0.04 * (num_decode + 1) + 0.03 * num_tokens + 0.03 * num_decode * 300 / 1024) / 1e3


def test_a_model_that_misjudges_prefill_does_not_starve_it() -> None:
    """The feedback prefill allowance: while the budget binds and the measured TPOT is well
    under target, the share grows past what the wrong model allows, up to what the true cost
    allows, and the steps still keep the running requests' TPOT."""
    # Setpoint 1: _true_step_s's costs are sized against the target itself.
    c = SloController(TPOT, max_num_seqs=1024, max_num_batched_tokens=8192, params=ControllerParams(setpoint=1.0))
    c.model = _DearPrefillModel(c.params.forgetting)
    first = c.token_budget(100, 100 * 300)
    budgets, steps = [], []
    for step in range(600):  # ~100 decodes beside an endless prefill backlog
        n = 100 + step % 7
        budget = c.token_budget(n, n * 300)
        steps.append(_true_step_s(n, budget))
        c.observe(StepSample(steps[-1], n + 1, n, budget, n * 300, num_waiting=(20, 0), num_admitted=(1, 0),
                             cap_hit=True, budget_hit=True))  # fmt: skip
        budgets.append(budget)
    goal = TPOT * (1 - c.params.margin / 2)
    ideal = 103 + int((goal - _true_step_s(103, 103)) / 0.03e-3)  # the budget the true cost allows
    assert first < 0.4 * ideal  # what the model alone gives
    assert statistics.median(budgets[-100:]) >= 0.8 * ideal, (first, statistics.median(budgets[-100:]), ideal)
    assert statistics.mean(steps[-100:]) <= TPOT


def test_the_step_time_model_has_no_negative_cost() -> None:
    """Slow first steps (a cold start: 2,000-token prefills at 400 ms) and then fast ones: the fit
    keeps every weight, the fixed cost too, at 0 or above (a negative fixed cost let the per-token
    cost absorb the cold start)."""
    model = StepTimeModel(0.98)
    for i in range(30):
        model.add(StepTimeModel.features(4 + i % 5, 2000 + 100 * (i % 7), 3000), 0.4 + 0.01 * (i % 3))
    for step in range(300):
        n = 100 + step % 7
        tokens = n + 16 + step % 5
        model.add(StepTimeModel.features(n + 1, tokens, n * 300), _true_step_s(n, tokens))
    weights = model.weights()
    assert weights is not None and min(weights) >= 0.0, weights


def test_queue_delay_prediction_per_class() -> None:
    c = SloController(TPOT, max_num_seqs=8, max_num_batched_tokens=2048)
    assert c.predicted_queue_delay_s(3) is None  # never backlogged: no rate yet
    for _ in range(c.params.interval):  # 20 ms steps, one interactive admission per step, batch starved
        c.observe(StepSample(0.020, 8, 8, 8, 800, num_waiting=(5, 5), num_admitted=(1, 0), cap_hit=True))
    assert c.predicted_queue_delay_s(10) == pytest.approx(10 / 50.0)
    assert c.predicted_queue_delay_s(1, batch=True) == float("inf")
    assert c.predicted_queue_delay_s(0, batch=True) == 0.0


def _dear_mixed_step_s(num_decode: int, num_prefill: int) -> float:
    """ms: 5 fixed + 0.04 a request + 0.03 a token (context 300 a request) + 20 for a mixed step."""
    seqs = num_decode + (num_prefill > 0)
    tokens = num_decode + num_prefill
    ms = 5 + 0.04 * seqs + 0.03 * tokens + 0.03 * num_decode * 300 / 1024 + 20 * (num_prefill > 0)
    return ms / 1e3


def test_a_dear_mixed_step_runs_rarely_and_large_from_banked_slack() -> None:
    """100 decodes (12 ms a step alone) beside a prefill backlog, a mixed step 20 ms dearer: no
    mixed step fits the goal on its own, so the controller runs the decodes alone, banks their
    slack, and spends it on chunks of 100+ tokens; the mean step (a request's TPOT)
    stays under target, and prefill moves at many times a sliver-per-step's pace."""
    # Setpoint 1: 100 decodes plus a mixed step's 20 ms are sized against the target itself.
    c = SloController(TPOT, max_num_seqs=1024, max_num_batched_tokens=8192, params=ControllerParams(setpoint=1.0))
    for i in range(60):  # a fitted model: steps of both kinds
        n, pre = 90 + i % 20, (i % 3 == 0) * (50 + 37 * i % 400)
        c.observe(StepSample(_dear_mixed_step_s(n, pre), n + (pre > 0), n, n + pre, n * 300))
    steps, prefill = [], []
    for _ in range(400):
        budget = c.token_budget(100, 100 * 300)
        pre = budget - 100
        steps.append(_dear_mixed_step_s(100, pre))
        prefill.append(pre)
        c.observe(StepSample(steps[-1], 100 + (pre > 0), 100, budget, 100 * 300, num_waiting=(20, 0),
                             budget_hit=pre > 0))  # fmt: skip
    late, late_prefill = steps[-200:], prefill[-200:]
    assert 0 < sum(1 for p in late_prefill if p) < 0.6 * len(late_prefill)  # decode-only steps between
    assert min(p for p in late_prefill if p) >= 100  # chunks, not slivers
    assert statistics.mean(late) <= TPOT
    sliver_rate = c.params.min_chunk / _dear_mixed_step_s(100, c.params.min_chunk)  # tokens/s, every step
    assert sum(late_prefill) / sum(late) > 5 * sliver_rate


def test_a_prefill_ahead_of_decodes_leaves_them_their_tokens() -> None:
    """A budget of just the decodes' tokens (a step that banks slack) with a prefill ahead of a
    decode in the running list (a later, shorter prompt finished first): the decode gets its
    token and the prefill waits; without the reservation the prefill took the whole budget."""
    from pagedserve.core.request import Request
    from pagedserve.sampling_params import SamplingParams
    from tests.core.sim import SimWorker
    from tests.slo.sim_load import Clock, make_sim_scheduler

    sched = make_sim_scheduler(SLO, Clock(), max_num_seqs=4, max_num_batched_tokens=64)
    worker = SimWorker(16)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    sched.add_request(Request("short", list(range(1, 9)), params, eos_token_id=None))
    sched.add_request(Request("long", list(range(1, 201)), params, eos_token_id=None))
    plan = sched.schedule()  # 64 tokens: "short" whole, "long" 56 of its 200
    sched.update_from_output(plan, worker.execute(plan))
    assert sched.requests["short"].num_computed_tokens >= 8 > 0 < sched.requests["long"].num_computed_tokens < 200
    sched.running.sort(key=lambda r: r.request_id != "long")  # the prefill ahead (as after a swap-in)
    assert sched.slo is not None
    sched.slo.caps = lambda running: (4, 1)  # type: ignore[method-assign]  # the decode's token only
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {"short": 1}


def test_the_saturated_prefill_rate_predicts_the_prefill_wait() -> None:
    """Prefill tokens per second are measured over steps that left seated prompts for later (the
    budget, not the demand, bounded them), deferred decode-only steps included; steps that took
    every prompt token there was measure demand, not capacity, and do not count."""
    c = SloController(TPOT, max_num_seqs=64, max_num_batched_tokens=2048)
    assert c.predicted_prefill_delay_s(5000) is None  # no saturated step yet
    for i in range(c.params.interval):
        # 32 decodes; a 200-token chunk of a 3000-token backlog every other step (20 ms), a
        # decode-only step between (10 ms): 200 tokens per 30 ms
        chunk = 200 if i % 2 == 0 else 0
        c.observe(StepSample(0.020 if chunk else 0.010, 32 + (chunk > 0), 32, 32 + chunk, 32 * 500,
                             prefill_backlog=3000))  # fmt: skip
    assert c.prefill_rate == pytest.approx(200 / 0.030)
    assert c.predicted_prefill_delay_s(2000) == pytest.approx(2000 / (200 / 0.030))
    assert c.predicted_prefill_delay_s(0) == 0.0
    for _ in range(c.params.interval):  # every prompt token taken: the backlog was the step's own
        c.observe(StepSample(0.020, 33, 32, 132, 32 * 500, prefill_backlog=100))
    assert c.prefill_rate == pytest.approx(200 / 0.030)  # unchanged


def test_a_light_load_breach_cuts_the_prefill_not_the_seats() -> None:
    """No request waited for a seat and decodes alone ran far under the pace: a breach came from
    the steps' prefill, so it cuts the prefill allowance and leaves the seat cap (a cut below the
    running batch would only queue the next arrivals). With decode-only steps near the pace the
    same breach cuts the seats too."""
    for decode_s, seats_cut in ((0.1, False), (0.7, True)):  # x aim
        c = SloController(TPOT, max_num_seqs=64, max_num_batched_tokens=2048)
        c.max_num_seqs, c.prefill_allowance = 64, 500
        aim = c.aim_s
        for i in range(c.params.interval):  # 27 running under a cap of 64; big chunks every other step
            mixed = i % 2 == 0
            c.observe(StepSample((2.0 if mixed else decode_s) * aim, 27 + mixed, 27, 27 + 500 * mixed, 27 * 400))
        assert c.prefill_allowance < 500
        assert (c.max_num_seqs < 27) == seats_cut, c.max_num_seqs


def test_the_scheduler_reports_the_prefill_ahead_of_each_class() -> None:
    """Seated requests' prompt rests count for both classes, waiting interactive prompts for
    both, waiting batch prompts only for batch; a step that leaves a seated prompt for later is
    a saturated sample, and the mean seated prompt follows the seated prompts."""
    from pagedserve.core.request import Request
    from pagedserve.sampling_params import SamplingParams
    from tests.core.sim import SimWorker
    from tests.slo.sim_load import Clock, make_sim_scheduler

    sched = make_sim_scheduler(SLO, Clock(), max_num_seqs=1, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    sched.add_request(Request("seated", list(range(1, 201)), params, eos_token_id=None))
    sched.add_request(Request("inter", list(range(1, 31)), params, eos_token_id=None))
    sched.add_request(Request("batch", list(range(1, 51)), params, eos_token_id=None, priority_class="batch"))
    assert sched.slo is not None
    sampled: list[StepSample] = []
    sched.slo.controller.observe = sampled.append  # type: ignore[method-assign]
    plan = sched.schedule()  # one seat: "seated" gets 64 of its 200 prompt tokens
    sched.update_from_output(plan, SimWorker(16).execute(plan))
    assert sampled[0].prefill_backlog == 199 > sampled[0].num_tokens == 64
    stats = sched.make_stats(plan)
    # rests: seated 200 - 64 - 1 = 135 (the last prompt token samples), inter 29, batch 49
    assert (stats.prefill_ahead_interactive, stats.prefill_ahead_batch) == (135 + 29, 135 + 29 + 49)
    assert stats.slo_mean_prompt_tokens == 200  # the first seated prompt sets the mean
