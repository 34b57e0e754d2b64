"""Linear layers whose weight format is owned by a `LinearMethod` (unquantized here; GPTQ/AWQ/FP8
methods in `model_executor/quantization/` plug in the same way).

Merged projections run as ONE matmul over stacked weights. The checkpoint keeps them apart, so
each parameter carries a `weight_loader(param, loaded_tensor, shard_id)` that copies a checkpoint
tensor into its slice along the parameter's `output_dim`:

    QKVLinear weight [(H + 2*KVH) * d, hidden]        MergedLinear (gate_up) [2 * I, hidden]
    rows  0        .. H*d            <- q_proj          rows 0 .. I    <- gate_proj (shard 0)
    rows  H*d      .. (H+KVH)*d      <- k_proj          rows I .. 2I   <- up_proj   (shard 1)
    rows  (H+KVH)*d .. (H+2KVH)*d    <- v_proj

Offsets are given in logical output features and rescaled by param.shape[output_dim] /
sum(output_sizes), so a method that packs several outputs into one element (int4 along the
output dim) reuses the same loader.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagedserve.kernels.registry import KernelSet
from pagedserve.model_executor.layers.context import BuildContext

__all__ = [
    "LinearMethod",
    "UnquantizedLinearMethod",
    "LinearBase",
    "Linear",
    "MergedLinear",
    "QKVLinear",
    "set_weight_attrs",
]

ShardId = str | int


def set_weight_attrs(param: Tensor, attrs: dict[str, Any]) -> None:
    """Attach loader metadata (output_dim, weight_loader, ...) to a parameter."""
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


class LinearMethod(ABC):
    """Owns a linear layer's parameters: their creation and the matmul that uses them."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int],
                       bias: bool, params_dtype: torch.dtype) -> None:
        """Register the parameters on `layer`; give each an `output_dim` attribute (or None)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:
        """x [T, input_size] -> [T, sum(output_sizes)]."""


class UnquantizedLinearMethod(LinearMethod):
    """weight [sum(output_sizes), input_size] in the model dtype, optional bias.

    Inputs of at most `kernels.gemv_limits.plain` rows (decode batches) go to the kernel set's
    GEMV when it has one: cuBLAS picks split-K plans with an extra reduce kernel for them and
    reaches ~75% of bandwidth on the 4096-wide projections; larger inputs use F.linear."""

    def __init__(self, kernels: KernelSet) -> None:
        # bound once, at construction
        self._gemv = kernels.fused_gemv
        self._gemv_max_tokens = kernels.gemv_limits.plain

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int],
                       bias: bool, params_dtype: torch.dtype) -> None:
        out = sum(output_sizes)
        # torch.empty: no random init; every element is overwritten by the loader.
        weight = nn.Parameter(torch.empty(out, input_size, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"output_dim": 0})
        layer.register_parameter("weight", weight)
        if bias:
            b = nn.Parameter(torch.empty(out, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(b, {"output_dim": 0})
            layer.register_parameter("bias", b)
        else:
            layer.register_parameter("bias", None)

    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:
        weight = cast(Tensor, layer.weight)
        bias = cast("Tensor | None", layer.bias)
        if self._gemv is not None and x.dim() == 2 and 0 < x.shape[0] <= self._gemv_max_tokens:
            return self._gemv(x, weight, bias=bias)
        return F.linear(x, weight, bias)


class LinearBase(nn.Module):
    """A linear map whose output is the concatenation of named shards (one shard = plain)."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool,
                 shard_ids: Sequence[ShardId] | None = None,
                 linear_method: LinearMethod | None = None, *, ctx: BuildContext) -> None:
        super().__init__()
        self.prefix = ctx.prefix
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        ids = list(shard_ids) if shard_ids is not None else list(range(len(self.output_sizes)))
        offsets: dict[ShardId, tuple[int, int]] = {}
        start = 0
        for sid, size in zip(ids, self.output_sizes, strict=True):
            offsets[sid] = (start, size)
            start += size
        self.shard_offsets = offsets  # shard id -> (offset, size) in logical output features
        self.linear_method = linear_method or UnquantizedLinearMethod(ctx.kernels)
        self.linear_method.create_weights(self, input_size, self.output_sizes, bias,
                                          torch.get_default_dtype())
        for param in self.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):
                set_weight_attrs(param, {"weight_loader": self.weight_loader})

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_method.apply(self, x)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: ShardId | None = None) -> None:
        """Copy a checkpoint tensor into `param` (whole, or the slice of `shard_id`)."""
        target = param.data
        output_dim = getattr(param, "output_dim", None)
        if shard_id is not None and output_dim is not None:
            if shard_id not in self.shard_offsets:
                raise ValueError(f"shard_id must be one of {list(self.shard_offsets)}, got {shard_id!r}")
            offset, size = self.shard_offsets[shard_id]
            per_feature, rem = divmod(param.shape[output_dim], self.output_size)
            if rem == 0 and per_feature >= 1:
                target = target.narrow(output_dim, offset * per_feature, size * per_feature)
            else:  # packed: several logical outputs per element
                pack = self.output_size // param.shape[output_dim]
                target = target.narrow(output_dim, offset // pack, size // pack)
        if target.shape != loaded.shape:
            raise ValueError(
                f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter slice "
                f"{tuple(target.shape)} (shard {shard_id!r}) of {type(self).__name__}")
        target.copy_(loaded)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_sizes}, bias={getattr(self, 'bias', None) is not None}"


class Linear(LinearBase):
    """Plain y = x W^T (+ b): o_proj, down_proj."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 linear_method: LinearMethod | None = None, *, ctx: BuildContext) -> None:
        super().__init__(input_size, [output_size], bias, linear_method=linear_method, ctx=ctx)


class MergedLinear(LinearBase):
    """Several projections of the same input stacked into one matmul (gate_up: shards 0, 1)."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 linear_method: LinearMethod | None = None, *, ctx: BuildContext) -> None:
        super().__init__(input_size, output_sizes, bias, linear_method=linear_method, ctx=ctx)


class QKVLinear(LinearBase):
    """q, k, v projections as one matmul; shard ids "q", "k", "v"."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, linear_method: LinearMethod | None = None, *,
                 ctx: BuildContext) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias,
                         shard_ids=["q", "k", "v"], linear_method=linear_method, ctx=ctx)

    def split(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[T, q+2kv] -> q [T, H*d], k [T, KVH*d], v [T, KVH*d] (views)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return q, k, v
