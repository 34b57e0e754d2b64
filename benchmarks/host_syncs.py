"""Where the host waits for the GPU: every synchronizing CUDA call, counted by its call site.

torch's sync debug mode ("warn") raises a warning at each call that makes the host wait for the
device (a `.item()`, a `bool(tensor)`, a `nonzero`, a blocking copy). Inside async scheduling's
launch any such wait serialises the step with the forward queued before it, so the audit names
them by the innermost frame of our package:

    with host_sync_sites(sites):      # sites: a Counter, {"pagedserve/worker/x.py:12 f": 3}
        engine.step()
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# torch's text for a wait; its one-time notice on entering the mode ("... does not yet detect all
# synchronizing operations") is not one
SYNC_WARNING = "called a synchronizing"


def call_site(frames: list[traceback.FrameSummary], package: str = "pagedserve") -> str:
    """The innermost frame under a directory named `package`, as 'package/...py:line function';
    the innermost frame at all when none is."""
    marker = f"/{package}/"
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if marker in path:
            return f"{package}/{path.rsplit(marker, 1)[1]}:{frame.lineno} {frame.name}"
    last = frames[-1] if frames else None
    return f"{last.filename}:{last.lineno} {last.name}" if last else "?"


@contextmanager
def host_sync_sites(sites: Counter[str], package: str = "pagedserve") -> Iterator[None]:
    """Counts into `sites` each synchronizing CUDA call made inside the block (no-op without a
    GPU: the CPU never waits for a device)."""
    import torch

    cuda = torch.cuda.is_available()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        previous = warnings.showwarning

        def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                   line: Any = None) -> None:  # fmt: skip
            if SYNC_WARNING in str(message):
                sites[call_site(traceback.extract_stack()[:-1], package)] += 1
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
