"""benchmarks/slo_serving.py --overload-repeats: each SLO-aware server runs the overload load that
many times (one row each, numbered), the server without objectives once, and the plot and the
JSON hold every run (stand-ins for the servers and the measured runs)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import benchmarks.slo_serving as slo_serving


def test_overload_repeats_give_one_row_each(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: list[str] = []
    runs: list[tuple[str, float, int | None]] = []

    @contextlib.contextmanager
    def fake_server(model: str, args: list[str], log: str, extra_env: Any = None) -> Iterator[tuple[str, Any]]:
        started.append(Path(log).name)
        yield "http://" + Path(log).stem, None

    def fake_run(base: str, work: Any, rate: float, args: Any, seed: int, n: int | None = None,
                 trace: bool = False) -> dict:  # fmt: skip
        runs.append((base, rate, n))
        slow = base.endswith("no-objectives") and rate > 20
        return {"rate_rps": rate, "requests": n or 0, "failed": 0, "goodput_rps": 3.0 if slow else rate * 0.8,
                "slo_attainment": 0.8, "tpot_p50_ms": 10.0, "tpot_p99_ms": 90.0 if slow else 20.0 + len(runs),
                "ttft_p50_ms": 100.0, "ttft_p99_ms": 900.0, "shed_429": 0 if slow else 5,
                "output_tokens_per_s": 1.0, "trace": [{"t_s": 0.0, "running": 1.0}] if trace else []}  # fmt: skip

    monkeypatch.setattr(slo_serving, "running_server", fake_server)
    monkeypatch.setattr(slo_serving, "_run", fake_run)
    monkeypatch.setattr(sys, "argv", ["slo_serving", "--model", "unused", "--out", str(tmp_path), "--num-requests", "64",
                                      "--sustainable-rate", "20", "--overload", "2", "--warmup-requests", "0",
                                      "--overload-repeats", "3", "--slo-variant", "span=4"])  # fmt: skip
    slo_serving.main()
    assert started == ["server-no-objectives.log", "server-slo-aware.log", "server-slo-aware-2.log"]
    result = json.loads((tmp_path / "slo_serving.json").read_text())
    labels = [(r["server"], r["load"], r.get("repeat", 1)) for r in result["runs"]]
    assert labels == [("no objectives", "light", 1), ("no objectives", "overload", 1),
                      ("SLO-aware", "light", 1), ("SLO-aware", "overload", 1), ("SLO-aware", "overload", 2),
                      ("SLO-aware", "overload", 3), ("SLO-aware (span=4)", "light", 1),
                      ("SLO-aware (span=4)", "overload", 1), ("SLO-aware (span=4)", "overload", 2),
                      ("SLO-aware (span=4)", "overload", 3)]  # fmt: skip
    overloads = [r for r in result["runs"] if r["load"] == "overload"]
    assert {r["rate_rps"] for r in overloads} == {40.0}
    # each repeat is a run of its own (its own figures), not one run copied
    assert len({r["tpot_p99_ms"] for r in overloads}) == len(overloads)
    assert result["plot"] in ("slo_serving.png", "slo_serving.svg") and (tmp_path / result["plot"]).stat().st_size > 0
