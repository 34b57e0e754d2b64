"""TEST-ONLY packer: an unquantized checkpoint rewritten in vLLM's "fp8" (e4m3) format.

Written from the published layout (quantization/fp8.py), round-to-nearest:

    scale = max |w| / 448        per tensor: float32 []; per output channel: [out, 1] or [out]
    weight = e4m3(w / scale)     float8_e4m3fn [out, in], saturated to +-448
    dequantized = float32(weight) * scale   (the float32 product the loader's dequantization
                                             computes, so the two agree bit for bit)
    input_scale                  static activation scheme: float32 [], from `input_scale(module)`

Modules named in `ignored_layers` keep their float weight (written back as they are read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from pagedserve.testing.quant_pack.common import QuantizedTensor, TensorQuantizer, quantize_checkpoint

__all__ = ["FP8_MAX", "fp8_quantizer", "pack_fp8_checkpoint", "quantize_fp8_rtn"]

FP8_MAX = 448.0  # the largest finite float8_e4m3fn value

ScaleLayout = Literal["tensor", "channel", "channel_2d"]  # [], [out], [out, 1]


def quantize_fp8_rtn(w: Tensor, *, per_channel: bool = False,
                     scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """w float32 [out, in] -> (e4m3 [out, in], scale float32 [] or [out], dequantized float32).
    `scale` overrides max|w|/448 (a merged weight's shared scale, say)."""
    w = w.float()
    if scale is None:
        amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
        scale = (amax / FP8_MAX).clamp(min=1.0 / (FP8_MAX * 512.0))
    rows = scale.reshape(-1, 1) if scale.dim() == 1 else scale
    q = (w / rows).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.float(), q.float() * rows


def fp8_quantizer(*, scales: ScaleLayout = "tensor",
                  input_scale: Callable[[str], float] | None = None,
                  ignored_layers: Iterable[str] = ()) -> TensorQuantizer:
    """The quantizer quantize_checkpoint drives: per-tensor or per-channel weight scales in the
    given layout, an input_scale per module when `input_scale` is given (static activations)."""
    ignored = set(ignored_layers)

    def quantize(module: str, w: Tensor) -> QuantizedTensor:
        if module in ignored:
            return QuantizedTensor({"weight": w}, w)
        q, scale, deq = quantize_fp8_rtn(w, per_channel=scales != "tensor")
        stored = {"weight": q, "weight_scale": scale.reshape(-1, 1) if scales == "channel_2d" else scale}
        if input_scale is not None:
            stored["input_scale"] = torch.tensor(float(input_scale(module)), dtype=torch.float32)
        return QuantizedTensor(stored, deq)

    return quantize


def pack_fp8_checkpoint(src: str | Path, dst: str | Path, *, scales: ScaleLayout = "tensor",
                        input_scale: Callable[[str], float] | None = None,
                        ignored_layers: Iterable[str] = ()) -> dict[str, Tensor]:
    """Write `dst` = `src` in the fp8 format (activation scheme "static" when `input_scale` is
    given, else "dynamic"); returns {weight name: dequantized float32 [out, in]}."""
    ignored = sorted(ignored_layers)
    config = {"quant_method": "fp8", "activation_scheme": "dynamic" if input_scale is None else "static",
              "ignored_layers": ignored}
    return quantize_checkpoint(src, dst, fp8_quantizer(scales=scales, input_scale=input_scale,
                                                       ignored_layers=ignored), config)
