"""PyTorch's int4 tensor-core matmul ("tinygemm", `torch._weight_int4pack_mm`) for a WNA16 weight.

tinygemm multiplies x [T, K] (bf16) by an int4 weight in its own tiled layout, dequantizing with

    w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]          g = k // group_size

inside tensor-core MMAs, which our CUDA-core GEMV cannot match at 1-16 tokens (it is bound by
instructions, about six per weight element; benchmarks/results/h200-2026-12-02-wna16/). The
GPTQ / AWQ dequantization w = (q - z) * s is the same affine map with zero = (8 - z) * s, so the
conversion is exact up to the bf16 rounding of that product (the same rounding a bf16 weight has).

    canonical WNA16Weight  qweight int32 [K/8, N] (value i of word r = row 8r + i), scales / zeros [G, N]
    ->  TinygemmInt4       packed: _convert_weight_to_int4pack's layout of q^T [N, K]
                           scales_and_zeros bf16 [G', N, 2] = (scale, (8 - zero) * scale)

tinygemm takes group sizes 32, 64, 128 and 256 only: one group over all of K (GPTQ group -1) is
stored as K / 128 groups that repeat the same scale and zero. It needs N % 8 == 0 and
K % (16 * inner_k_tiles) == 0; act-order weights keep their perm (y = x[:, perm] @ W).
`supports` answers whether a weight qualifies. On the CPU the same arithmetic runs through
`_weight_int4pack_mm_for_cpu` (a different packing), which the tests use to check the conversion.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pagedserve.kernels.reference_quant import WNA16Weight, unpack_along_rows

__all__ = ["GROUP_SIZES", "TinygemmInt4", "supports", "tinygemm_matmul", "tinygemm_prepare"]

GROUP_SIZES = (32, 64, 128, 256)
# K values per inner tile step of the packed layout (2, 4 or 8 x 16); 8 needs K % 128 == 0.
DEFAULT_INNER_K_TILES = 8


class TinygemmInt4(NamedTuple):
    packed: Tensor  # the op's layout (CUDA: int32 [N/8, K/(16 ikt), 32, ikt/2]; CPU: uint8 [N, K/2])
    scales_and_zeros: Tensor  # bf16 [G', N, 2]
    perm: Tensor | None  # int64 [K]: y = x[:, perm] @ W
    group_size: int  # G' = K / group_size
    in_features: int
    out_features: int


def _inner_k_tiles(k: int) -> int:
    for ikt in (DEFAULT_INNER_K_TILES, 4, 2):
        if k % (16 * ikt) == 0:
            return ikt
    return 0


def _group(w: WNA16Weight) -> int:
    """tinygemm's group size for w (0: none fits)."""
    k = w.in_features
    if w.group_size in GROUP_SIZES:
        return w.group_size
    if w.group_size == k and k % 128 == 0:  # one group over K, as repeated groups of 128
        return 128
    return 0


def supports(w: WNA16Weight) -> bool:
    """Whether tinygemm can multiply w: 4 bits, a bf16 model, a group size it knows, N % 8, K % 32."""
    return (w.bits == 4 and w.scales.dtype == torch.bfloat16 and _group(w) > 0
            and w.out_features % 8 == 0 and _inner_k_tiles(w.in_features) > 0)


def tinygemm_prepare(w: WNA16Weight, inner_k_tiles: int | None = None) -> TinygemmInt4:
    """The canonical weight in tinygemm's layout, on w's device (new tensors); inner_k_tiles
    (2, 4 or 8; default the largest K allows) is a layout choice the benchmark sweeps."""
    if not supports(w):
        raise ValueError(f"tinygemm cannot take this weight: bits {w.bits}, dtype {w.scales.dtype}, group "
                         f"{w.group_size}, [{w.in_features}, {w.out_features}]")
    k, n, group = w.in_features, w.out_features, _group(w)
    q_t = unpack_along_rows(w.qweight, 4).t().contiguous()  # int32 [N, K] in [0, 16)
    scales, zeros = w.scales.float(), w.zeros.float()  # [G, N]
    if group != w.group_size:  # whole-K group: repeat it over the K / 128 groups tinygemm reads
        scales = scales.expand(k // group, n)
        zeros = zeros.expand(k // group, n)
    scales_and_zeros = torch.stack([scales, (8.0 - zeros) * scales], dim=-1).to(torch.bfloat16).contiguous()
    ikt = inner_k_tiles or _inner_k_tiles(k)
    if ikt not in (2, 4, 8) or k % (16 * ikt):
        raise ValueError(f"inner_k_tiles must be 2, 4 or 8 and divide K / 16 ({k}), got {ikt}")
    if q_t.is_cuda:  # two values a byte, the even k in the high nibble
        as_bytes = ((q_t[:, ::2] << 4) | q_t[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(as_bytes, ikt)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(q_t, ikt)
    perm = None if w.perm is None else w.perm.to(torch.int64)
    return TinygemmInt4(packed, scales_and_zeros, perm, group, k, n)


def tinygemm_matmul(x: Tensor, w: TinygemmInt4) -> Tensor:
    """x [T, K] bf16 -> x @ W [T, N] bf16 (float32 accumulation inside the op)."""
    if x.dim() != 2 or x.shape[1] != w.in_features or x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bf16 [T, {w.in_features}], got {x.dtype} {tuple(x.shape)}")
    if w.perm is not None:
        x = x[:, w.perm]
    x = x.contiguous()
    if x.is_cuda:
        return torch._weight_int4pack_mm(x, w.packed, w.group_size, w.scales_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x, w.packed, w.group_size, w.scales_and_zeros)
