"""The engine-core process must not outlive the HTTP process that spawned it.

An orphaned engine keeps computing abandoned requests and holding GPU memory, so two guards run:

    1. PR_SET_PDEATHSIG(SIGKILL) through prctl (Linux): the kernel kills us when the *thread* that
       spawned us exits. That thread is the server's event-loop thread, which lives as long as the
       server, but the signal is tied to a thread, not the process, so it is not enough alone.
    2. A watchdog thread polling os.getppid() on a timer: re-parenting (to init or a subreaper)
       means the parent is gone, whatever the main thread is busy with (a long step included).

Terminal Ctrl-C reaches the whole process group; the engine ignores SIGINT so that only its
parent decides when it stops (the server drains first, then shuts the engine down).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 0.5


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` when the spawning thread dies. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def parent_is_alive(parent_pid: int) -> bool:
    """Once the parent dies we are re-parented, so our ppid no longer names it."""
    return os.getppid() == parent_pid


def _watch(parent_pid: int, interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        if not parent_is_alive(parent_pid):
            logger.error("engine core: the server process %d is gone; exiting", parent_pid)
            os._exit(1)  # no cleanup to wait for: the sockets' peer and the requests are gone


def guard_parent(parent_pid: int, interval_s: float = WATCH_INTERVAL_S) -> None:
    """Install both guards in the engine process (call first thing in its entry point)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_parent_death_signal()
    if not parent_is_alive(parent_pid):  # died before prctl took effect: the signal never comes
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid, interval_s), name="parent-watch", daemon=True).start()
