"""What every layer constructor is given: the kernel set, the attention backend, the quantization
config, the parallel group and the layer's own name (prefix).

Built once by the loader (`BuildContext.create(get_kernel_set(name))`) and handed down the
module tree, each parent passing `ctx.child("mlp.gate_up_proj")`-style copies, so a layer binds
its kernels at construction (the forward pass does no lookups and no device checks) and nothing
selects kernels through a module global. Frozen: a child never changes its parent's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from pagedserve.kernels.attention_backend import AttentionBackend
from pagedserve.kernels.registry import TORCH_KERNELS, KernelSet

if TYPE_CHECKING:
    from pagedserve.model_executor.quantization.base import QuantConfig

__all__ = ["BuildContext", "Communicator", "ParallelGroup"]


class Communicator(Protocol):
    """Collectives over one tensor-parallel group (implemented over torch.distributed in
    pagedserve/distributed/). Every rank of the group calls each method in the same order."""

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum of `x` over the ranks (same shape); may reduce in place and return `x`."""
        ...

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:
        """The ranks' `x` concatenated along `dim`, in rank order."""
        ...


@dataclass(frozen=True, slots=True)
class ParallelGroup:
    """This process's place in the tensor-parallel group. `comm` None: no collectives (a layer's
    parallel path is never taken), only for world_size 1. A one-rank group may still have a
    communicator: the "mp" executor at tensor_parallel_size 1 runs its one rank in a real
    torch.distributed group (NCCL on a GPU), so the collective path runs on a single device."""

    rank: int = 0
    world_size: int = 1
    comm: Communicator | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.world_size}")
        if self.comm is None and self.world_size > 1:
            raise ValueError("a ParallelGroup of more than one rank needs a communicator")


@dataclass(frozen=True, slots=True)
class BuildContext:
    kernels: KernelSet
    attention: AttentionBackend  # normally kernels.attention; tests may put another one in
    # Picks each linear layer's LinearMethod by prefix (quantization/base.py); None = unquantized.
    quant_config: QuantConfig | None = None
    parallel: ParallelGroup = field(default_factory=ParallelGroup)
    prefix: str = ""  # dotted module name of the layer being built ("" = the root)

    @classmethod
    def create(cls, kernels: KernelSet = TORCH_KERNELS, attention: AttentionBackend | None = None,
               parallel: ParallelGroup | None = None,
               quant_config: QuantConfig | None = None) -> BuildContext:
        """A root context for `kernels`, with their own attention backend unless one is given."""
        return cls(kernels, attention if attention is not None else kernels.attention,
                   quant_config=quant_config, parallel=parallel or ParallelGroup())

    def child(self, name: str) -> BuildContext:
        """The context of submodule `name` ("mlp.gate_up_proj"): same settings, longer prefix."""
        return replace(self, prefix=f"{self.prefix}.{name}" if self.prefix else name)
