"""benchmarks/slo_serving.py's search for the sustainable rate and its run sizes, against a
stand-in for the measured runs (a server that meets the objectives below a set rate)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

import benchmarks.slo_serving as slo_serving


def _args(**overrides: Any) -> argparse.Namespace:
    base = dict(start_rate=32.0, max_rate=1024.0, bisect=1, probe_requests=400, num_requests=2400,
                seconds=25.0, slo_tpot_ms=30.0, slo_ttft_ms=2000.0)  # fmt: skip
    return argparse.Namespace(**{**base, **overrides})


def _search(monkeypatch: pytest.MonkeyPatch, capacity: float, args: argparse.Namespace) -> tuple[float, list[dict]]:
    def fake_run(base: str, work: Any, rate: float, args: argparse.Namespace, seed: int, n: int | None = None,
                 trace: bool = False) -> dict:  # fmt: skip
        ok = rate <= capacity
        return {"rate_rps": rate, "requests": n, "failed": 0, "tpot_p99_ms": 20.0 if ok else 60.0,
                "ttft_p99_ms": 500.0 if ok else 5000.0}  # fmt: skip

    monkeypatch.setattr(slo_serving, "_run", fake_run)
    return slo_serving.find_sustainable_rate("http://unused", None, args)


def test_the_search_doubles_then_bisects_within_max_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    rate, probes = _search(monkeypatch, 45.0, _args(max_rate=48.0))
    assert [p["rate_rps"] for p in probes] == [32.0, 48.0, 40.0]
    assert rate == 40.0


def test_a_max_rate_met_ends_the_search_there(monkeypatch: pytest.MonkeyPatch) -> None:
    rate, probes = _search(monkeypatch, 100.0, _args(start_rate=53.33, max_rate=53.33, bisect=0))
    assert [p["rate_rps"] for p in probes] == [53.33] and rate == 53.33
    rate, probes = _search(monkeypatch, 100.0, _args(max_rate=96.0, bisect=0))
    assert [p["rate_rps"] for p in probes] == [32.0, 64.0, 96.0] and rate == 96.0


def test_probes_last_seconds_of_arrivals(monkeypatch: pytest.MonkeyPatch) -> None:
    _, probes = _search(monkeypatch, 45.0, _args(max_rate=48.0))
    # 25 s at 32, 48 and 40 req/s, never fewer than --probe-requests nor more than --num-requests
    assert [p["requests"] for p in probes] == [800, 1200, 1000]
    args = _args(seconds=25.0, num_requests=1000)
    assert slo_serving._size(400, 8.0, args) == 400 and slo_serving._size(400, 60.0, args) == 1000
    assert slo_serving._size(400, 60.0, _args(seconds=0.0)) == 400


def test_the_search_halves_when_the_start_breaks_the_objectives(monkeypatch: pytest.MonkeyPatch) -> None:
    rate, probes = _search(monkeypatch, 10.0, _args())
    assert [p["rate_rps"] for p in probes] == [32.0, 16.0, 8.0, 12.0]
    assert rate == 8.0
