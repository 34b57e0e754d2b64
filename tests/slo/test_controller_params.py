"""ControllerParams' overrides (PAGEDSERVE_SLO_CONTROLLER) and the setpoint: the controller
steers the TPOT signal to setpoint x target, so a setpoint below 1 holds a lower batch and a
lower TPOT under the same load (simulated, deterministic: tests/slo/sim_load.py)."""

from __future__ import annotations

import pytest

from pagedserve.config import SloConfig
from pagedserve.core.slo_controller import ENV_OVERRIDES, ControllerParams, SloController
from tests.slo.sim_load import Phase, SimResult, simulate

TPOT = 0.030
SLO = SloConfig(ttft_s={"interactive": 1.0}, tpot_s={"interactive": TPOT})


def test_overrides_parse_names_and_numbers() -> None:
    params = ControllerParams.from_env("setpoint=0.7, span=8,percentile=0.95")
    assert (params.setpoint, params.span, params.percentile) == (0.7, 8, 0.95)
    assert isinstance(params.span, int)
    assert ControllerParams.from_env("") == ControllerParams()


@pytest.mark.parametrize("text, message", [
    ("bogus=1", "a name among"), ("setpoint", "name=value"), ("span=eight", "needs a number"),
    ("setpoint=1.5", "in (0, 1]"), ("setpoint=0", "in (0, 1]"),
])  # fmt: skip
def test_bad_overrides_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=ENV_OVERRIDES) as err:
        ControllerParams.from_env(text)
    assert message in str(err.value)


def test_the_scheduler_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_OVERRIDES, "setpoint=0.5")
    from pagedserve.core.slo_scheduler import SchedulerSlo

    slo = SchedulerSlo(SLO, 64, 2048, clock=lambda: 0.0)
    assert slo.controller.params.setpoint == 0.5
    assert slo.controller.aim_s == pytest.approx(0.5 * TPOT)


def test_a_lower_setpoint_holds_a_smaller_batch_and_a_lower_tpot(monkeypatch: pytest.MonkeyPatch) -> None:
    phases = [Phase(20, 40.0)]  # 1.6x the capacity at the 30 ms target (tests/slo/test_controller_sim.py)
    monkeypatch.setenv(ENV_OVERRIDES, "setpoint=1")
    plain = simulate(phases, SLO, admission=True, seed=5)
    monkeypatch.setenv(ENV_OVERRIDES, "setpoint=0.7")
    lower = simulate(phases, SLO, admission=True, seed=5)

    def late_tpots(result: SimResult) -> list[float]:
        return [r.tpot for r in result.records.values() if r.arrival >= 10 and r.tpot is not None]

    assert lower.caps[-1] < plain.caps[-1]
    assert max(late_tpots(lower)) < 0.7 * TPOT < max(late_tpots(plain)) < TPOT


def test_setpoint_one_is_the_target_itself() -> None:
    c = SloController(TPOT, 64, 2048, ControllerParams(setpoint=1.0))
    assert c.aim_s == TPOT
    assert SloController(TPOT, 64, 2048).aim_s == pytest.approx(ControllerParams().setpoint * TPOT)
