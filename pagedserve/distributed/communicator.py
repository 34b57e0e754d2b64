"""The tensor-parallel group of one worker process, over torch.distributed.

    backend   gloo on the CPU (tensors in host memory), NCCL on GPUs (one GPU per rank: cuda:rank)
    rendezvous a FileStore in the executor's private directory: no port to pick, none to collide
              with another engine on the same host
    Communicator  all_reduce (RowParallelLinear, the vocab-parallel embedding) and all_gather
              (the vocab-parallel LM head), the interface of model_executor/layers/context.py

Every rank calls the collectives in the same order (they run the same step on the same plan).
A rank that dies makes its peers' next collective fail (gloo: the connection closes) or block
(NCCL): the executor's driver notices the death itself and never waits on a collective.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from pagedserve.model_executor.layers.context import ParallelGroup

__all__ = [
    "TorchDistributedCommunicator",
    "init_tensor_parallel",
    "shutdown_tensor_parallel",
    "worker_environment",
]

# NVLink SHARP / multicast objects are not available on every host (and not to every container):
# the workers leave them off, so NCCL picks its ordinary ring / tree algorithms everywhere.
_WORKER_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def worker_environment(base: Mapping[str, str], device: str) -> dict[str, str]:
    """The environment of a worker process: `base` plus the NCCL settings above (set only where
    `base` does not choose them) and, on the CPU, gloo bound to the loopback interface (every
    rank is on this host; the host name may resolve to an address gloo cannot connect to)."""
    env = dict(base)
    for key, value in _WORKER_ENV.items():
        env.setdefault(key, value)
    if device == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


class TorchDistributedCommunicator:
    """Collectives over the default process group (the tensor-parallel group: the only group)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum over the ranks, in place; returns `x`."""
        dist.all_reduce(x)
        return x

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:
        """The ranks' `x` (same shape on every rank) concatenated along `dim` in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=dim)


def init_tensor_parallel(rank: int, world_size: int, store_path: str, device: torch.device,
                         timeout_s: float = 600.0) -> ParallelGroup:
    """Join the group of `world_size` ranks that rendezvous in `store_path` (a file all ranks can
    reach; it must not exist before the first rank arrives). `timeout_s` bounds the rendezvous and
    every collective (a peer that stops answering fails the call instead of hanging it for ever).
    One rank (the "mp" executor at tensor_parallel_size 1, as vLLM's) is a real group of one: the
    layers take their collective path, so NCCL is exercised on a single GPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.FileStore(store_path, world_size)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)  # type: ignore[arg-type]
    # one collective now: a rank that cannot reach the others fails at start-up, not at step 1
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)
    if int(probe.item()) != world_size:
        raise RuntimeError(f"tensor-parallel start-up: {int(probe.item())} of {world_size} ranks answered")
    return ParallelGroup(rank, world_size, TorchDistributedCommunicator(rank, world_size))


def shutdown_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

