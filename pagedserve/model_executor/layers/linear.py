"""Tensor-parallel linear layers whose weights are owned by a `LinearMethod`.

Two seams: the parallel group (`ctx.parallel`) decides which slice of the weight this rank holds,
and the quantization config (`ctx.quant_config.get_method(layer, ctx.prefix)`) decides how it is
stored and multiplied (UnquantizedLinearMethod below when there is no config or it declines).

    ColumnParallelLinear  W [out, in]: rank r holds output rows r*out/tp ..; output stays split
    Merged... / QKV...    several column-parallel projections as ONE matmul over stacked shards
    RowParallelLinear     W [out, in]: rank r holds input columns r*in/tp ..; all-reduce of y
    ReplicatedLinear      every rank holds all of W

Merged layout (this rank's parameter; tp = 2, KVH = 1 < tp, so k and v are replicated):

    QKVParallelLinear weight [(H/tp + 2*kvh) * d, hidden]    MergedColumn (gate_up) [2*I/tp, hidden]
    rows 0 .. H/tp*d             <- q_proj heads of rank r      rows 0 .. I/tp    <- gate_proj slice r
    next kvh*d rows              <- k_proj head(s) r // (tp/KVH) rows I/tp .. 2I/tp <- up_proj slice r
    next kvh*d rows              <- v_proj head(s) likewise      (kvh = max(1, KVH/tp))

Loading follows the parameters' declared attributes, never the checkpoint tensor's shape:
`output_dim` (sliced per shard by column layers), `input_dim` (sliced by row layers: the
parameter's own extent there is this rank's slice) and `packed_dim` / `pack_factor` (offsets
along the packed dim are divided by pack_factor). With world_size 1 every slice is the whole
tensor and forward() is exactly one `apply` (F.linear or the kernel set's GEMV).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagedserve.kernels.registry import KernelSet
from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.quantization.base import LinearMethod

__all__ = [
    "ColumnParallelLinear",
    "Linear",
    "LinearBase",
    "LinearMethod",
    "MergedColumnParallelLinear",
    "MergedLinear",
    "QKVLinear",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "UnquantizedLinearMethod",
    "kv_heads_per_rank",
    "set_weight_attrs",
]

ShardId = str | int


def set_weight_attrs(param: Tensor, attrs: dict[str, Any]) -> None:
    """Attach loader metadata (output_dim, input_dim, weight_loader, ...) to a parameter."""
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


def _divide(n: int, d: int, what: str) -> int:
    if n % d != 0:
        raise ValueError(f"{what} ({n}) must be divisible by the tensor-parallel size ({d})")
    return n // d


def kv_heads_per_rank(num_kv_heads: int, world_size: int) -> int:
    """KV heads each rank holds: KVH / tp, or 1 (replicated) when KVH < tp (then tp % KVH == 0)."""
    if num_kv_heads >= world_size:
        return _divide(num_kv_heads, world_size, "num_kv_heads")
    if world_size % num_kv_heads != 0:
        raise ValueError(f"the tensor-parallel size ({world_size}) must be a multiple of "
                         f"num_kv_heads ({num_kv_heads}) to replicate the KV heads")
    return 1


class UnquantizedLinearMethod(LinearMethod):
    """weight [sum(output_partition_sizes), input_size_per_partition] in the model dtype.

    Inputs of at most `kernels.gemv_limits.plain` rows (decode batches) go to the kernel set's
    GEMV when it has one: cuBLAS picks split-K plans with an extra reduce kernel for them and
    reaches ~75% of bandwidth on the 4096-wide projections; larger inputs use F.linear. The same
    GEMV folds the RMSNorm before the projection (up to gemv_limits.norm rows) and SiLU-and-mul
    after gate_up (up to gemv_limits.gated rows): 3 kernels per decoder layer fewer."""

    def __init__(self, kernels: KernelSet) -> None:
        # bound once, at construction
        self._gemv = kernels.fused_gemv
        self._gemv_max_tokens = kernels.gemv_limits.plain
        has = self._gemv is not None
        self._norm_max_tokens = kernels.gemv_limits.norm if has else 0
        self._gated_max_tokens = kernels.gemv_limits.gated if has else 0

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: Sequence[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        # torch.empty: no random init; every element is overwritten by the loader.
        weight = nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                          dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"output_dim": 0, "input_dim": 1})
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: Tensor, *, norm: nn.Module | None = None,
              residual: Tensor | None = None, gated: bool = False) -> Any:
        weight = cast(Tensor, layer.weight)
        bias = cast("Tensor | None", layer.bias)
        if norm is None:
            if self._gemv is not None and x.dim() == 2 and 0 < x.shape[0] <= self._gemv_max_tokens:
                return self._gemv(x, weight, bias=bias)
            return F.linear(x, weight, bias)
        assert self._gemv is not None  # only called within fused_max_tokens, > 0 with a GEMV
        return self._gemv(x, weight, bias=bias, norm_weight=norm.weight, residual=residual,
                          eps=norm.eps, gated=gated)

    def fused_max_tokens(self, *, gated: bool) -> int:
        return self._gated_max_tokens if gated else self._norm_max_tokens


class LinearBase(nn.Module):
    """A linear map whose output is the concatenation of named shards, split over the ranks.

    Subclasses give the whole layer's sizes and, per shard, the slot of the whole checkpoint
    shard that this rank holds (`shard_slots`: rank, or rank // replicas for replicated KV heads).
    `split_input`: row parallel (this rank holds input_size / tp input features)."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool, *,
                 ctx: BuildContext, shard_ids: Sequence[ShardId] | None = None,
                 output_partition_sizes: Sequence[int] | None = None,
                 shard_slots: Sequence[int] | None = None, split_input: bool = False) -> None:
        super().__init__()
        group = ctx.parallel
        self.prefix = ctx.prefix
        self.tp_rank, self.tp_size = group.rank, group.world_size
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.split_input = split_input
        self.input_size_per_partition = (_divide(input_size, group.world_size, f"{ctx.prefix} input size")
                                         if split_input else input_size)
        parts = list(output_partition_sizes) if output_partition_sizes is not None else list(output_sizes)
        slots = list(shard_slots) if shard_slots is not None else [0] * len(parts)
        self.output_partition_sizes = parts
        ids = list(shard_ids) if shard_ids is not None else list(range(len(parts)))
        self.shard_ids = ids
        # shard id -> (offset in this rank's param, size here, size in the checkpoint, slot),
        # all in logical output features (divided by pack_factor along a packed output dim)
        self._shards: dict[ShardId, tuple[int, int, int, int]] = {}
        offset = 0
        for sid, local, full, slot in zip(ids, parts, self.output_sizes, slots, strict=True):
            self._shards[sid] = (offset, local, full, slot)
            offset += local
        self.kernels = ctx.kernels  # the set a quantized method binds its kernels from (get_method)
        quant = ctx.quant_config
        method = quant.get_method(self, ctx.prefix) if quant is not None else None
        self.linear_method: LinearMethod = method if method is not None else UnquantizedLinearMethod(ctx.kernels)
        dtype = torch.get_default_dtype()
        self.linear_method.create_weights(self, self.input_size_per_partition, parts, input_size,
                                          self.output_size, dtype)
        if bias:
            b = nn.Parameter(torch.empty(sum(parts), dtype=dtype), requires_grad=False)
            set_weight_attrs(b, {"output_dim": 0})
            self.register_parameter("bias", b)
        else:
            self.register_parameter("bias", None)
        for param in self.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):
                set_weight_attrs(param, {"weight_loader": self.weight_loader})
        self._apply_method = self.linear_method.apply  # bound once
        self._norm_max_tokens = self.linear_method.fused_max_tokens(gated=False)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self._apply_method(self, x))

    def norm_forward(self, x: Tensor, residual: Tensor | None,
                     norm: nn.Module) -> tuple[Tensor, Tensor]:
        """This layer applied to rms_norm(x [+ residual]): (y, x [+ residual]). The method fuses
        the norm up to its fused_max_tokens rows; otherwise the norm runs first, separately."""
        if x.shape[0] <= self._norm_max_tokens:
            return cast(tuple[Tensor, Tensor], self._apply_method(self, x, norm=norm, residual=residual))
        if residual is None:
            return self(norm(x)), x
        h, residual = norm(x, residual)
        return self(h), residual

    # ------------------------------------------------------------------ loading

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: ShardId | None = None) -> None:
        """Copy this rank's slice of a checkpoint tensor (whole, or shard `shard_id`) into `param`.
        A merged layer given a whole fused tensor (shard_id None) splits it into its shards."""
        output_dim = getattr(param, "output_dim", None)
        if output_dim is None or self.split_input:  # no output features to select
            if shard_id is not None and len(self.shard_ids) > 1:
                raise ValueError(f"{self.prefix}: a parameter without output_dim cannot take shard {shard_id!r}")
            self._copy(param, self._input_slice(param, loaded), shard_id)
            return
        pack = _pack(param, output_dim)
        if shard_id is None:
            if len(self.shard_ids) > 1:  # an already-fused checkpoint tensor (W_pack, c_attn, ...)
                sizes = [self._shards[s][2] // pack for s in self.shard_ids]
                if loaded.shape[output_dim] != sum(sizes):
                    raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit the "
                                     f"fused shards {sizes} of {self.prefix or type(self).__name__}")
                for sid, piece in zip(self.shard_ids, loaded.split(sizes, dim=output_dim), strict=True):
                    self.weight_loader(param, piece, sid)
                return
            shard_id = self.shard_ids[0]
        if shard_id not in self._shards:
            raise ValueError(f"shard_id must be one of {list(self._shards)}, got {shard_id!r}")
        offset, local, full, slot = self._shards[shard_id]
        for n in (offset, local, full):
            if n % pack:
                raise ValueError(f"{self.prefix}: {n} output features do not split into packs of {pack}")
        if loaded.shape[output_dim] != full // pack:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit shard "
                             f"{shard_id!r} ({full // pack} along dim {output_dim}) of {type(self).__name__}")
        target = param.data.narrow(output_dim, offset // pack, local // pack)
        source = loaded.narrow(output_dim, slot * local // pack, local // pack)
        self._copy(target, self._input_slice(param, source), shard_id)

    def _input_slice(self, param: Tensor, loaded: Tensor) -> Tensor:
        """Row parallel: rank r's [r*n, (r+1)*n) of the input dim, n = the parameter's extent."""
        input_dim = getattr(param, "input_dim", None)
        if not self.split_input or input_dim is None or self.tp_size == 1:
            return loaded
        n = param.shape[input_dim]
        if loaded.shape[input_dim] != n * self.tp_size:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit "
                             f"{self.tp_size} x {n} along dim {input_dim} of {self.prefix}")
        return loaded.narrow(input_dim, self.tp_rank * n, n)

    def _copy(self, target: Tensor, loaded: Tensor, shard_id: ShardId | None) -> None:
        data = target.data
        if data.shape != loaded.shape:
            raise ValueError(
                f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter slice "
                f"{tuple(data.shape)} (shard {shard_id!r}) of {type(self).__name__}")
        data.copy_(loaded)

    def extra_repr(self) -> str:
        return (f"in={self.input_size_per_partition}, out={self.output_partition_sizes}, "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}")


def _pack(param: Tensor, dim: int) -> int:
    return int(getattr(param, "pack_factor", 1)) if getattr(param, "packed_dim", None) == dim else 1


class ReplicatedLinear(LinearBase):
    """y = x W^T (+ b) with the whole W on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *,
                 ctx: BuildContext) -> None:
        super().__init__(input_size, [output_size], bias, ctx=ctx)


class MergedColumnParallelLinear(LinearBase):
    """Projections of the same input stacked into one matmul (gate_up: shards 0, 1), each split
    along its outputs; the output stays split (rank r: [shard 0 slice r | shard 1 slice r])."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False, *,
                 ctx: BuildContext) -> None:
        tp, rank = ctx.parallel.world_size, ctx.parallel.rank
        parts = [_divide(s, tp, f"{ctx.prefix} output size") for s in output_sizes]
        super().__init__(input_size, output_sizes, bias, ctx=ctx, output_partition_sizes=parts,
                         shard_slots=[rank] * len(parts))


class ColumnParallelLinear(MergedColumnParallelLinear):
    """y = x W^T (+ b), this rank's output features only."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *,
                 ctx: BuildContext) -> None:
        super().__init__(input_size, [output_size], bias, ctx=ctx)


class QKVParallelLinear(LinearBase):
    """q, k, v projections as one matmul (shard ids "q", "k", "v"), this rank's heads: H/tp query
    heads and KVH/tp KV heads, or one replicated KV head when KVH < tp."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, *, ctx: BuildContext) -> None:
        tp, rank = ctx.parallel.world_size, ctx.parallel.rank
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "num_heads")  # this rank's
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp)
        kv_slot = rank // (tp // num_kv_heads) if num_kv_heads < tp else rank
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        kv_full = num_kv_heads * head_dim
        super().__init__(hidden_size, [num_heads * head_dim, kv_full, kv_full], bias, ctx=ctx,
                         shard_ids=["q", "k", "v"],
                         output_partition_sizes=[self.q_size, self.kv_size, self.kv_size],
                         shard_slots=[rank, kv_slot, kv_slot])

    def split(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[T, q+2kv] -> q [T, H*d], k [T, KVH*d], v [T, KVH*d] (this rank's heads; views)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return q, k, v


class RowParallelLinear(LinearBase):
    """y = x W^T (+ b) with x split along its features (the column-parallel layer before it
    left it so): each rank multiplies its slice, then the partial sums are all-reduced. The bias
    is added once: rank 0 holds it, the others hold zeros."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *,
                 ctx: BuildContext) -> None:
        super().__init__(input_size, [output_size], bias, ctx=ctx, split_input=True)
        comm = ctx.parallel.comm
        if comm is not None:  # a group (world_size >= 1); without one forward() stays LinearBase's
            self._all_reduce = comm.all_reduce
            self.forward = self._forward_all_reduce  # type: ignore[method-assign]

    def _forward_all_reduce(self, x: Tensor) -> Tensor:
        return cast(Tensor, self._all_reduce(self._apply_method(self, x)))

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: ShardId | None = None) -> None:
        super().weight_loader(param, loaded, shard_id)
        if param is self.bias and self.tp_rank > 0:
            param.data.zero_()


# The names the model code used before the parallel layers (tests and tools construct them).
Linear = ReplicatedLinear
MergedLinear = MergedColumnParallelLinear
QKVLinear = QKVParallelLinear
