"""The router is a gateway: it talks HTTP to servers and loads nothing of the engine (no torch,
no model code), so it starts in a second and runs on machines without an accelerator stack."""

from __future__ import annotations

import subprocess
import sys

ENGINE_SIDE = ("pagedserve.engine", "pagedserve.worker", "pagedserve.model_executor", "pagedserve.kernels")


def test_router_imports_nothing_of_the_engine() -> None:
    code = (
        "import sys, pagedserve.router.app\n"
        f"bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith({ENGINE_SIDE!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", out.stdout
