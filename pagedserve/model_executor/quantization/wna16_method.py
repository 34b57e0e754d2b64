"""The one LinearMethod of the weight-only integer formats (GPTQ, AWQ): the checkpoint's tensors
are registered as published, so the loader slices and merges them like any parameter, and are
converted once after loading into the canonical `reference_quant.WNA16Weight`, which the kernel
set repacks (`wna16_prepare`) and multiplies by (`wna16_matmul`).

This rank's checkpoint tensors (K input features, N output features, pf = 32 // bits, G groups):

    GPTQ  qweight int32 [K / pf, N]  packed along K: word r, bits [bits*i, bits*(i+1)) = row pf*r + i
          qzeros  int32 [G, N / pf]  packed along N likewise: word c, value i = column pf*c + i;
                                     checkpoint_format "gptq" stores zero - 1, "gptq_v2" the zero
          scales        [G, N]
          g_idx   int32 [K]          the group of every input row; non-monotonic with desc_act
    AWQ   qweight int32 [K, N / 8]   4-bit, packed along N in the interleaved order:
          qzeros  int32 [G, N / 8]     word bits  31..28 27..24 23..20 19..16 15..12 11..8 7..4 3..0
          scales        [G, N]         column 8c+    7      5      3      1      6     4    2    0
                                     (the zero itself; AWQ's kernel reads the pairs 0|1, 2|3, ...)

    w[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]

Act-order (g_idx not sorted): the rows are sorted by group once, `perm` = that order, so the
canonical weight holds contiguous groups and y = x[:, perm] @ W. Row-parallel ranks hold K / tp
rows: their own groups (scales sharded along G) without act-order; with it every rank keeps all
G groups and picks the ones its rows use, which must then be whole groups (else refused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from pagedserve.kernels.reference_quant import WNA16Weight, pack_along_rows, unpack_along_rows
from pagedserve.kernels.registry import KernelSet
from pagedserve.model_executor.layers.linear import set_weight_attrs
from pagedserve.model_executor.quantization.base import LinearMethod

__all__ = ["AWQ_ORDER", "WNA16Format", "WNA16LinearMethod", "unpack_awq_columns", "unpack_columns"]

# AWQ's packing order: bits [4i, 4i+4) of a word hold column 8c + AWQ_ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_CHECKPOINT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True, slots=True)
class WNA16Format:
    """One layer's stored layout, as its QuantConfig read it from the checkpoint."""

    kind: Literal["gptq", "awq"]
    bits: int  # 4 or 8 (AWQ: 4)
    group_size: int  # input rows per group; -1: one group over all of K
    desc_act: bool = False  # GPTQ act-order: g_idx may be unsorted (every rank keeps all groups)
    zero_minus_one: bool = False  # GPTQ checkpoint_format "gptq" (v1) stores zero - 1

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits


def unpack_columns(packed: Tensor, bits: int) -> Tensor:
    """int32 [R, N / pf] packed along N (value i of word c = column pf*c + i) -> int32 [R, N]."""
    return unpack_along_rows(packed.t().contiguous(), bits).t().contiguous()


def unpack_awq_columns(packed: Tensor) -> Tensor:
    """int32 [R, N / 8], AWQ's interleaved 4-bit order -> int32 [R, N] values in [0, 16)."""
    rows, words = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)  # slot i at 4i
    slots = (packed.unsqueeze(-1) >> shifts) & 0xF  # [R, N/8, 8]: slot i = column AWQ_ORDER[i]
    # column j sits in slot AWQ_ORDER.index(j): 0 4 1 5 2 6 3 7
    reverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)], device=packed.device)
    return slots[..., reverse].reshape(rows, words * 8)


class WNA16LinearMethod(LinearMethod):
    """GPTQ / AWQ linear layer: checkpoint tensors in, `layer.wna16_weight` (the kernel set's
    prepared WNA16Weight) out. The decode fusion (RMSNorm before, SiLU-and-mul after) is offered
    up to the kernel set's `wna16_fused_max_tokens(gated=)` token counts; 0 (the torch set)
    declines it (the layer then runs the norm itself)."""

    def __init__(self, fmt: WNA16Format, kernels: KernelSet, prefix: str = "") -> None:
        self.fmt = fmt
        self.prefix = prefix
        self._prepare: Callable[[WNA16Weight], Any] = kernels.wna16_prepare
        self._matmul: Callable[..., Any] = kernels.wna16_matmul
        fused = kernels.wna16_fused_max_tokens  # bound once; the torch set's answers 0
        self._norm_max_tokens = int(fused(gated=False))
        self._gated_max_tokens = int(fused(gated=True))
        self._row_split = False
        self._shard_groups = False

    # ------------------------------------------------------------------ create

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: Sequence[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        fmt, k, n = self.fmt, input_size_per_partition, sum(output_partition_sizes)
        pf, g = fmt.pack_factor, fmt.group_size
        where = self.prefix or type(layer).__name__
        if g != -1 and input_size % g:
            raise ValueError(f"{where}: {input_size} input features are not a multiple of "
                             f"group_size {g}")
        for size in output_partition_sizes:  # qzeros (and AWQ's qweight) pack along N
            if size % pf:
                raise ValueError(f"{where}: {size} output features do not split into packs of {pf}")
        self._row_split = k != input_size
        # A row-parallel rank holds its own groups, unless every rank needs all of them.
        self._shard_groups = self._row_split and g != -1 and not fmt.desc_act
        if self._shard_groups and k % g:
            raise ValueError(f"{where}: this rank's {k} input features are not a multiple of "
                             f"group_size {g}")
        groups = (k // g) if self._shard_groups else (1 if g == -1 else input_size // g)
        group_dim = 0 if self._shard_groups else None

        def param(shape: tuple[int, ...], dtype: torch.dtype, **attrs: Any) -> nn.Parameter:
            p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, attrs)
            return p

        if fmt.kind == "gptq":
            if k % pf:
                raise ValueError(f"{where}: {k} input features do not split into packs of {pf}")
            qweight = param((k // pf, n), torch.int32, input_dim=0, output_dim=1, packed_dim=0,
                            pack_factor=pf)
            g_idx = param((k,), torch.int32, input_dim=0, weight_loader=_g_idx_loader(layer, where))
            layer.register_parameter("g_idx", g_idx)
        else:
            qweight = param((k, n // pf), torch.int32, input_dim=0, output_dim=1, packed_dim=1,
                            pack_factor=pf)
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("qzeros", param((groups, n // pf), torch.int32, input_dim=group_dim,
                                                 output_dim=1, packed_dim=1, pack_factor=pf))
        layer.register_parameter("scales", param((groups, n), params_dtype, input_dim=group_dim,
                                                 output_dim=1))

    # ------------------------------------------------------------------ convert

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        fmt = self.fmt
        qweight = cast(Tensor, layer.qweight).data
        scales = cast(Tensor, layer.scales).data
        perm = None
        if fmt.kind == "gptq":
            q = unpack_along_rows(qweight, fmt.bits)  # [K, N]
            zeros = unpack_columns(cast(Tensor, layer.qzeros).data, fmt.bits)  # [G, N]
            if fmt.zero_minus_one:  # v1 stores zero - 1 (unmasked +1, as the GPTQ kernels read it)
                zeros = zeros + 1
            perm, rows, group = self._sort_groups(cast(Tensor, layer.g_idx).data,
                                                  cast(Any, layer).tp_rank, scales.shape[0])
            if rows is not None:
                scales, zeros = scales[rows], zeros[rows]
            if perm is not None:
                q = q[perm]
            packed = pack_along_rows(q, fmt.bits) if perm is not None else qweight
        else:
            q = unpack_awq_columns(qweight)  # [K, N]
            zeros = unpack_awq_columns(cast(Tensor, layer.qzeros).data)
            group = q.shape[0] if fmt.group_size == -1 else fmt.group_size
            packed = pack_along_rows(q, fmt.bits)
        weight = WNA16Weight(packed.contiguous(), scales.contiguous(),
                             zeros.to(scales.dtype).contiguous(), perm, fmt.bits, group)
        for name in _CHECKPOINT_TENSORS:  # the published copies are not needed any more
            if name in layer._parameters:
                delattr(layer, name)
        layer.wna16_weight = self._prepare(weight)

    def _sort_groups(self, g_idx: Tensor, rank: int,
                     num_groups: int) -> tuple[Tensor | None, Tensor | None, int]:
        """(perm: this rank's rows sorted by group, or None if already sorted; rows: the scales /
        zeros rows of the sorted groups, or None if all in order; the canonical group_size)."""
        k, g = g_idx.shape[0], self.fmt.group_size
        where = self.prefix or "layer"
        groups = g_idx.to(torch.int64)
        if g == -1:
            if bool((groups != 0).any()):
                raise ValueError(f"{where}: g_idx must be all 0 with group_size -1")
            return None, None, k
        if self._shard_groups:  # this rank's groups are rank*K/g .. ; its scales start there
            groups = groups - rank * (k // g)
        perm = torch.argsort(groups, stable=True)
        present, counts = torch.unique_consecutive(groups[perm], return_counts=True)
        if bool((counts != g).any()) or bool((present < 0).any()) or bool((present >= num_groups).any()):
            split = " (act-order groups are split across the tensor-parallel ranks; load it with " \
                    "tensor_parallel_size 1)" if self._row_split else ""
            raise ValueError(f"{where}: g_idx does not put exactly group_size ({g}) rows in each "
                             f"group{split}")
        in_order = torch.arange(k, device=perm.device)
        sorted_perm = None if torch.equal(perm, in_order) else perm
        rows = None if torch.equal(present, torch.arange(present.numel(), device=present.device)) \
            else present
        return sorted_perm, rows, g

    # ------------------------------------------------------------------ multiply

    def apply(self, layer: nn.Module, x: Tensor, *, norm: nn.Module | None = None,
              residual: Tensor | None = None, gated: bool = False) -> Any:
        weight = layer.wna16_weight
        bias = cast("Tensor | None", layer.bias)
        if norm is None:
            return self._matmul(x, weight, bias, gated=gated) if gated else self._matmul(x, weight, bias)
        return self._matmul(x, weight, bias, norm_weight=norm.weight, residual=residual,
                            eps=norm.eps, gated=gated)

    def fused_max_tokens(self, *, gated: bool) -> int:
        return self._gated_max_tokens if gated else self._norm_max_tokens


def _g_idx_loader(layer: nn.Module, where: str) -> Callable[..., None]:
    """g_idx has no output dim: every shard of a merged layer (q, k, v share the input, so the
    same act-order) brings the same [K]; the first is kept and the others must equal it."""
    seen: set[Any] = set()

    def load(param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
        local = cast(Any, layer)._input_slice(param, loaded)  # row parallel: this rank's rows
        if tuple(local.shape) != tuple(param.shape):
            raise ValueError(f"{where}: checkpoint g_idx of shape {tuple(loaded.shape)} does not fit "
                             f"{tuple(param.shape)}")
        if seen and not torch.equal(param.data, local.to(param.device, param.dtype)):
            raise ValueError(f"{where}: the merged shards {sorted(map(str, seen))} and {shard_id!r} "
                             f"have different g_idx; one act-order per input is needed")
        param.data.copy_(local)
        seen.add(shard_id)

    return load
