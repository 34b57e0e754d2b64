"""TEST-ONLY AWQ packer (GEMM version): AutoAWQ's round-to-nearest with zero point (its
`pseudo_quantize_tensor`, without the activation-aware scale search) in the published layout.

A module's weight w [N, K], groups of G input rows, q and z 4-bit:

    qweight int32 [K, N / 8]   word c of row k: bits [4i, 4i+4) = q[k, 8c + ORDER[i]]
    qzeros  int32 [K / G, N / 8]  the same packing of z [K / G, N]
    scales  fp16  [K / G, N]                     ORDER = 0 2 4 6 1 3 5 7
    w[n, k] = (q[k, n] - z[k // G, n]) * scales[k // G, n]

Per group and output column: scale = max(max - min, 1e-5) / 15, z = clamp(-round(min / scale),
0, 15), q = clamp(round(w / scale) + z, 0, 15).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pagedserve.testing.quant_pack.common import QuantizedTensor, TensorQuantizer

__all__ = ["ORDER", "awq_config", "awq_quantizer", "pack_awq"]

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(values: Tensor) -> Tensor:
    """int [R, N] in [0, 16) -> int32 [R, N / 8] in AWQ's interleaved order."""
    v = values.to(torch.int64)
    words = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for i, column in enumerate(ORDER):
        words |= v[:, column::8] << (4 * i)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def awq_quantizer(group_size: int = 128, *, modules_to_not_convert: Sequence[str] = ()) -> TensorQuantizer:
    """The TensorQuantizer for quantize_checkpoint; modules whose name contains one of
    `modules_to_not_convert` keep their float weight (as AutoAWQ leaves them)."""

    def quantize(module: str, w: Tensor) -> QuantizedTensor:
        if any(m in module for m in modules_to_not_convert):
            return QuantizedTensor({"weight": w}, w)
        n, k = w.shape
        if k % group_size or n % 8:
            raise ValueError(f"{module}: [{n}, {k}] does not fit 4-bit groups of {group_size}")
        grouped = w.t().reshape(k // group_size, group_size, n)  # [G, rows, N]
        lo, hi = grouped.amin(dim=1), grouped.amax(dim=1)
        scales = ((hi - lo).clamp(min=1e-5) / 15).half()  # [G, N], stored (and used) in fp16
        s = scales.float()
        zeros = (-torch.round(lo / s)).clamp(0, 15)
        q = torch.clamp(torch.round(grouped / s[:, None]) + zeros[:, None], 0, 15)
        dequantized = ((q - zeros[:, None]) * s[:, None]).reshape(k, n).t().contiguous()
        tensors = {"qweight": pack_awq(q.reshape(k, n)), "qzeros": pack_awq(zeros), "scales": scales}
        return QuantizedTensor(tensors, dequantized)

    return quantize


def awq_config(group_size: int = 128, *, autoawq_file: bool = False, version: str = "gemm",
               modules_to_not_convert: Sequence[str] | None = None) -> dict[str, Any]:
    """As published: config.json's `quantization_config` (transformers' AwqConfig), or with
    autoawq_file AutoAWQ's quant_config.json (its own key names, no quant_method)."""
    if autoawq_file:
        return {"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": version.upper()}
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
            "version": version, "modules_to_not_convert": list(modules_to_not_convert) if
            modules_to_not_convert else None}
