"""benchmarks/mixed_step.py on the CPU with a tiny model: every row times the step it names (each
prefill row's one-token request finishes in its timed step), and the surcharge is that step
against the same batch's decode-only step."""

from __future__ import annotations

import argparse

from benchmarks.mixed_step import run


def test_rows_time_the_steps_they_name() -> None:
    args = argparse.Namespace(model=None, decodes=[2, 4], prefill=[8, 40], decode_prompt=16, repeats=2, warmup=3, mixed_graph_max_tokens=1024,
                              max_model_len=256, enforce_eager=True, profile=False)  # fmt: skip
    rows = run(args)
    assert [(r["decodes"], r["prefill"]) for r in rows] == [(2, 0), (2, 8), (2, 40), (4, 0), (4, 8), (4, 40)]
    for r in rows:
        base = next(b for b in rows if b["decodes"] == r["decodes"] and b["prefill"] == 0)
        assert r["step_ms"] > 0 and abs(r["surcharge_ms"] - (r["step_ms"] - base["step_ms"])) < 1e-9
