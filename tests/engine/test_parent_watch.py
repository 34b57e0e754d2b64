"""engine/parent_watch.py: a process guarded by it dies soon after its parent is SIGKILLed, by
either guard alone (the prctl parent-death signal, or the getppid watchdog thread).

    test process ──> middle (python: spawns child, sleeps) ──> child (guarded, sleeps)
    SIGKILL middle ──> child gone (no /proc entry, or an unreaped zombie)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pagedserve.engine.parent_watch import parent_is_alive, set_parent_death_signal

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and prctl")

CHILDREN = {
    "prctl": "pw.set_parent_death_signal()",
    "watchdog": "pw.set_parent_death_signal = lambda sig=0: False\npw.guard_parent(os.getppid(), 0.1)",
    "both": "pw.guard_parent(os.getppid(), 0.1)",
    "none": "",
}


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def spawn_chain(guard: str, ready: Path) -> tuple[subprocess.Popen[str], int]:
    """The child touches `ready` once its guards are set; the chain's child pid is returned then."""
    child = (
        "import os, sys, time\nimport pagedserve.engine.parent_watch as pw\n" + guard
        + "\nopen(sys.argv[1], 'w').close()\ntime.sleep(120)\n"
    )
    middle = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", {child!r}, {str(ready)!r}])
        print(p.pid, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", middle], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child_pid = int(proc.stdout.readline())
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the child never set its guards up"
    return proc, child_pid


def kill_middle_and_wait(proc: subprocess.Popen[str], child_pid: int, wait_s: float) -> bool:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + wait_s
    while not gone(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gone(child_pid)


@pytest.mark.parametrize("guard", ["prctl", "watchdog", "both"])
def test_orphan_exits(guard: str, tmp_path: Path) -> None:
    proc, child_pid = spawn_chain(CHILDREN[guard], tmp_path / "ready")
    assert kill_middle_and_wait(proc, child_pid, 30.0)


def test_unguarded_orphan_lives_on(tmp_path: Path) -> None:
    """The control: without a guard the orphan keeps running (so the tests above can fail)."""
    proc, child_pid = spawn_chain(CHILDREN["none"], tmp_path / "ready")
    try:
        assert not kill_middle_and_wait(proc, child_pid, 2.0)
    finally:
        if not gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_helpers_in_this_process() -> None:
    assert parent_is_alive(os.getppid()) and not parent_is_alive(os.getppid() + 1_000_000)
    assert set_parent_death_signal(0)  # signal 0: clears it (this test process keeps none)
