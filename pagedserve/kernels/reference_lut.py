"""Plain-torch twins for lookup-table (non-uniform) 4-bit weights: SqueezeLLM.

Layout, as SqueezeLLM checkpoints store it (and vLLM reads it):

    qweight       int32 [K / 8, N]   4-bit indices packed along K, GPTQ bit order:
                                     qweight[r, n] bits [4i, 4i + 4) = idx[8r + i, n]
    lookup_table  [N, 16]            per output channel n, the 16 values an index stands for

    w[k, n] = lookup_table[n, idx[k, n]]          (y = x @ w, i.e. F.linear(x, w.T))

    qweight word (r, n):  bit 31 ........................... 0
                          | i7 | i6 | i5 | i4 | i3 | i2 | i1 | i0 |   i_j = idx[8r + j, n]

The twin dequantizes to the nn.Linear layout W [N, K] (contiguous) and calls F.linear, so on CPU
a SqueezeLLM layer computes exactly what an unquantized layer holding W computes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pagedserve.kernels.reference_gguf import linear_with_extras
from pagedserve.kernels.reference_quant import unpack_along_rows

__all__ = ["LUT_SIZE", "dequantize_lut", "lut_matmul"]

LUT_SIZE = 16  # 4-bit indices


def dequantize_lut(qweight: Tensor, lookup_table: Tensor) -> Tensor:
    """qweight int32 [K/8, N], lookup_table [N, 16] -> W [N, K] in the table's dtype."""
    n = qweight.shape[1]
    if lookup_table.shape != (n, LUT_SIZE):
        raise ValueError(f"lookup_table must be [{n}, {LUT_SIZE}], got {tuple(lookup_table.shape)}")
    idx = unpack_along_rows(qweight, 4)  # [K, N] in [0, 16)
    return lookup_table.gather(1, idx.t().to(torch.int64))  # [N, K]


def lut_matmul(x: Tensor, qweight: Tensor, lookup_table: Tensor, bias: Tensor | None = None, *,
               norm_weight: Tensor | None = None, residual: Tensor | None = None,
               eps: float = 1e-6, gated: bool = False) -> Any:
    """x [T, K] -> y [T, N] (+ bias) in x's dtype: F.linear with the dequantized weight (and the
    decode extras of reference_gguf.linear_with_extras: the RMSNorm before, SiLU-and-mul after)."""
    return linear_with_extras(x, dequantize_lut(qweight, lookup_table), bias, norm_weight=norm_weight,
                              residual=residual, eps=eps, gated=gated)
