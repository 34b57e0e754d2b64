"""benchmarks/sync_points.py: its call sites name the innermost pagedserve frames, innermost first."""

from __future__ import annotations

from traceback import FrameSummary

from benchmarks.sync_points import call_site


def test_call_site_names_the_innermost_pagedserve_frames() -> None:
    stack = [
        FrameSummary("/repo/benchmarks/sync_points.py", 70, "main"),
        FrameSummary("/repo/pagedserve/engine/engine_core.py", 195, "_step_async"),
        FrameSummary("/repo/pagedserve/worker/model_runner.py", 120, "launch"),
        FrameSummary("/venv/lib/python3.12/site-packages/torch/_tensor.py", 40, "tolist"),
    ]
    assert call_site(stack) == "worker/model_runner.py:120 launch <- engine/engine_core.py:195 _step_async"
    assert call_site(stack, depth=1) == "worker/model_runner.py:120 launch"
    assert call_site(stack[:1]) == ""
