"""SqueezeLLM: 4-bit indices into a per-output-channel lookup table (non-uniform quantization).

Checkpoint (config.json quantization_config, or quant_config.json):
{"quant_method": "squeezellm", "wbits": 4}; every projection X of the decoder layers stores

    X.qweight       int32 [K / 8, N]   indices packed along K (input_dim 0, packed_dim 0),
                                       value i of a word in bits 4i .. 4i+3 (GPTQ order)
    X.lookup_table  [N, 16]            (output_dim 0), float16 in published checkpoints
    X.bias          as unquantized

    w[k, n] = lookup_table[n, idx[k, n]]        (layout diagram: kernels/reference_lut.py)

Merged projections (qkv, gate_up) stack their shards along N: qweight's columns and
lookup_table's rows, which is what the loader's output_dim slicing does. The lm_head and the
embeddings are not linear layers of this method and stay unquantized, as in vLLM.

apply() runs the kernel set's `lut_matmul`: the torch twin dequantizes and calls F.linear; the
Triton set uses a fused LUT GEMV for a few tokens (with the decode fusion of the RMSNorm before
and the SiLU-and-mul after, as the unquantized GEMV) and dequantize + cuBLAS beyond.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from pagedserve.kernels.reference_lut import LUT_SIZE
from pagedserve.kernels.registry import KernelSet
from pagedserve.model_executor.layers.linear import set_weight_attrs
from pagedserve.model_executor.quantization.base import LinearMethod, QuantConfig, register_quant_config

__all__ = ["SqueezeLLMConfig", "SqueezeLLMLinearMethod"]

_PACK = 8  # 4-bit indices per int32


class SqueezeLLMLinearMethod(LinearMethod):
    """qweight [K/8, N] int32 and lookup_table [N, 16]. The decode fusion (RMSNorm before,
    SiLU-and-mul after) runs in the kernel set's lut_matmul up to its lut_fused_max_tokens."""

    def __init__(self, kernels: KernelSet) -> None:
        self._matmul = kernels.lut_matmul  # bound once
        self._fused_max_tokens = kernels.lut_fused_max_tokens

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: Sequence[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        if input_size_per_partition % _PACK:
            raise ValueError(f"squeezellm: this rank's input size ({input_size_per_partition}) must be "
                             f"a multiple of {_PACK} (indices are packed 8 to an int32 along K)")
        n = sum(output_partition_sizes)
        qweight = nn.Parameter(torch.empty(input_size_per_partition // _PACK, n, dtype=torch.int32),
                               requires_grad=False)
        set_weight_attrs(qweight, {"input_dim": 0, "output_dim": 1, "packed_dim": 0, "pack_factor": _PACK})
        table = nn.Parameter(torch.empty(n, LUT_SIZE, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(table, {"output_dim": 0})
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("lookup_table", table)

    def apply(self, layer: nn.Module, x: Tensor, *, norm: nn.Module | None = None,
              residual: Tensor | None = None, gated: bool = False) -> Any:
        args = (x, cast(Tensor, layer.qweight), cast(Tensor, layer.lookup_table), cast("Tensor | None", layer.bias))
        if norm is None:
            return self._matmul(*args)
        return self._matmul(*args, norm_weight=norm.weight, residual=residual, eps=norm.eps, gated=gated)

    def fused_max_tokens(self, *, gated: bool) -> int:
        return self._fused_max_tokens


@register_quant_config
class SqueezeLLMConfig(QuantConfig):
    name: ClassVar[str] = "squeezellm"

    def __init__(self, weight_bits: int = 4) -> None:
        self.weight_bits = weight_bits
        self.kernels: KernelSet | None = None  # taken from the layer's build context

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SqueezeLLMConfig:
        bits = config.get("wbits", config.get("bits"))
        if bits != 4:
            raise ValueError(f"squeezellm: only 4-bit checkpoints exist and are supported "
                             f"(wbits: 4), got wbits={bits!r}")
        return cls(4)

    def get_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        if prefix.rpartition(".")[2] == "lm_head":
            return None
        return SqueezeLLMLinearMethod(_kernels_of(layer))


def _kernels_of(layer: nn.Module) -> KernelSet:
    kernels = getattr(layer, "kernels", None)
    if kernels is None:
        raise RuntimeError("the linear layer carries no kernel set (LinearBase sets layer.kernels)")
    return cast(KernelSet, kernels)
