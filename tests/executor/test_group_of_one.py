"""The "mp" executor's rank at tensor_parallel_size 1 is a real torch.distributed group of one
(gloo here, NCCL on a GPU), so the layers' collective path runs on a single device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.model_executor.layers.context import ParallelGroup

_CHILD = """
import sys, torch
from pagedserve.distributed.communicator import init_tensor_parallel, shutdown_tensor_parallel
group = init_tensor_parallel(0, 1, sys.argv[1], torch.device("cpu"), timeout_s=60)
assert group.world_size == 1 and group.comm is not None
x = torch.arange(6.0).view(2, 3)
assert torch.equal(group.comm.all_reduce(x.clone()), x)
assert torch.equal(group.comm.all_gather(x, -1), x)
shutdown_tensor_parallel()
print("ok")
"""


def test_one_rank_joins_a_real_group(tmp_path: Path) -> None:
    # its own process: a process group is global state, which the other tests must not inherit
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "store")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_more_than_one_rank_needs_a_communicator() -> None:
    assert ParallelGroup().comm is None
    with pytest.raises(ValueError, match="needs a communicator"):
        ParallelGroup(0, 2)
