"""TEST-ONLY quantization method "test_int4": symmetric per-output-row int4, two values per uint8
along the output dim. It exists to exercise the quantization seam (prefix selection, packed
parameters sliced by the loader, the post-load hook, the decode fusion declined), not as a format.

Checkpoint tensors of a quantized module X (config.json quantization_config =
{"quant_method": "test_int4", "modules": [checkpoint module names]}):

    X.qweight  uint8 [out / 2, in]   row i = (q[2i] + 8) | (q[2i + 1] + 8) << 4,  q in [-8, 7]
    X.scales   float [out]            w[r, :] ~= q[r, :] * scales[r]
    X.bias     as unquantized

process_weights_after_loading unpacks qweight to int8 `q` [out, in] (and drops qweight); apply
computes (x @ q^T) * scales (+ bias).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagedserve.model_executor.layers.linear import set_weight_attrs
from pagedserve.model_executor.quantization.base import LinearMethod, QuantConfig

NAME = "test_int4"


def quantize(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """w [out, in] (out even) -> (qweight uint8 [out/2, in], scales [out], dequantized w)."""
    scales = (w.abs().amax(dim=1) / 7).clamp(min=1e-8)
    q = torch.clamp(torch.round(w / scales[:, None]), -8, 7).to(torch.int16)
    u = (q + 8).to(torch.uint8)
    packed = u[0::2] | (u[1::2] << 4)
    return packed, scales.to(w.dtype), (q.to(w.dtype) * scales[:, None])


def unpack(packed: Tensor) -> Tensor:
    """uint8 [n, in] -> int8 [2n, in]: rows 2i (low nibble) and 2i+1 (high nibble)."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=1).reshape(-1, packed.shape[1])


class Int4Method(LinearMethod):
    def __init__(self, config: Int4Config) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: Sequence[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        out = sum(output_partition_sizes)
        qweight = nn.Parameter(torch.empty(out // 2, input_size_per_partition, dtype=torch.uint8),
                               requires_grad=False)
        set_weight_attrs(qweight, {"output_dim": 0, "input_dim": 1, "packed_dim": 0, "pack_factor": 2})
        scales = nn.Parameter(torch.empty(out, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(scales, {"output_dim": 0})
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("scales", scales)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.register_buffer("q", unpack(layer.qweight.data), persistent=False)
        del layer.qweight  # the packed copy is not needed any more
        self.config.processed.append(layer.prefix)

    def apply(self, layer: nn.Module, x: Tensor, *, norm: nn.Module | None = None,
              residual: Tensor | None = None, gated: bool = False) -> Any:
        # declined fusion: the layers never pass a norm here (fused_max_tokens is 0)
        assert norm is None and residual is None and not gated
        self.config.applied.add(layer.prefix)
        y = F.linear(x, layer.q.to(x.dtype)) * layer.scales
        return y if layer.bias is None else y + layer.bias


class Int4Config(QuantConfig):
    name: ClassVar[str] = NAME

    def __init__(self, modules: list[str]) -> None:
        self.modules = modules
        self.processed: list[str] = []  # prefixes whose post-load hook ran
        self.applied: set[str] = set()  # prefixes whose apply ran

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Int4Config:
        modules = config.get("modules")
        if not isinstance(modules, list):
            raise ValueError("test_int4 needs a 'modules' list")
        return cls(list(modules))

    def get_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        parts = self.checkpoint_prefixes(prefix)  # qkv_proj -> q_proj, k_proj, v_proj
        chosen = [p in self.modules for p in parts]
        if any(chosen) and not all(chosen):
            raise ValueError(f"{prefix}: test_int4 quantizes all of {parts} or none")
        return Int4Method(self) if all(chosen) else None
