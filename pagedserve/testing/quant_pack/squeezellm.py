"""TEST-ONLY SqueezeLLM packer, written from the published layout (kernels/reference_lut.py).

    deq = pack_squeezellm(src, dst)       dst: the checkpoint with qweight / lookup_table per
                                          projection and quantization_config
                                          {"quant_method": "squeezellm", "wbits": 4}

The lookup table of output channel n is k-means-free: the 16 quantiles (i + 0.5) / 16 of row n of
W [N, K], rounded to float16 (the table's published dtype); each weight takes the index of its
nearest table value. SqueezeLLM's sensitivity-weighted k-means is not needed to test a loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pagedserve.kernels.reference_lut import LUT_SIZE, dequantize_lut
from pagedserve.kernels.reference_quant import pack_along_rows
from pagedserve.testing.quant_pack.common import QuantizedTensor, quantize_checkpoint

__all__ = ["QUANT_CONFIG", "pack_squeezellm", "squeezellm_quantize"]

QUANT_CONFIG: dict[str, Any] = {"quant_method": "squeezellm", "wbits": 4}


def squeezellm_quantize(module: str, w: Tensor) -> QuantizedTensor:
    """w float32 [N, K] (K a multiple of 8) -> qweight int32 [K/8, N], lookup_table fp16 [N, 16]."""
    del module
    levels = (torch.arange(LUT_SIZE, dtype=torch.float32) + 0.5) / LUT_SIZE
    table = torch.quantile(w, levels, dim=1).t().contiguous()  # [N, 16], ascending per row
    table = table.to(torch.float16)
    idx = (w[:, :, None] - table.float()[:, None, :]).abs().argmin(dim=2)  # [N, K]
    qweight = pack_along_rows(idx.t().contiguous(), 4)  # [K/8, N]
    dequantized = dequantize_lut(qweight, table).float()  # [N, K]
    return QuantizedTensor({"qweight": qweight, "lookup_table": table}, dequantized)


def pack_squeezellm(src: str | Path, dst: str | Path, **kwargs: Any) -> dict[str, Tensor]:
    """`src` (unquantized) as a SqueezeLLM checkpoint in `dst`; returns {weight name: float32
    [out, in] it dequantizes to}. kwargs go to quantize_checkpoint (modules=, config_location=)."""
    return quantize_checkpoint(src, dst, squeezellm_quantize, QUANT_CONFIG, **kwargs)
