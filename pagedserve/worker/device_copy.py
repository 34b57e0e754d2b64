"""Small host lists onto the device without waiting for it.

`torch.tensor(values, device="cuda")` copies synchronously: the host waits until every kernel
queued before the copy has run. Inside async scheduling's launch of step n+1 those kernels are
step n+1's own forward, so the launch would return only once the step is done and nothing would
overlap (measured on the H200: random sampling drawn on the device gained nothing offline and
cost the server a step of TTFT). A copy from a CPU tensor with non_blocking=True is queued in
stream order instead (the runner's inputs, the sampling state and the placeholder indices all
go this way): the driver stages the pageable source before it returns, so the list may go at once. On the CPU it is a plain tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def list_to_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """values (numbers, or equal-length lists / tuples of them) as a tensor of dtype on device,
    queued, not waited for."""
    host = torch.tensor(values, dtype=dtype)
    return host if device.type == "cpu" else host.to(device, non_blocking=True)
