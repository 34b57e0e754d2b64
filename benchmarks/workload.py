"""The fixed ShareGPT-like request mix every benchmark and every peer runs (issue 4's recipe); it
lives in the package (pagedserve/tune/workload.py) so that `pagedserve tune` replays the same mix."""

from __future__ import annotations

from pagedserve.tune.workload import Workload, sharegpt_like

__all__ = ["Workload", "sharegpt_like"]
