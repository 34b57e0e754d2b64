"""AWQ checkpoints (AutoAWQ, GEMM version), read as published.

The quantization config, in either spelling:

    config.json quantization_config        quant_config.json (AutoAWQ; pass quantization="awq")
    bits              4                    w_bit
    group_size        64, 128, ...         q_group_size     (a positive divisor of every K)
    zero_point        true                 zero_point       (false: refused)
    version           "gemm"               version "GEMM"   ("gemv", "gemv_fast": refused)
    modules_to_not_convert  [names]: modules whose name contains one stay unquantized

The tensors (qweight [K, N/8] packed along N in the interleaved order 0 2 4 6 1 3 5 7) and their
conversion are in wna16_method.py. Torch-free at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pagedserve.model_executor.quantization.base import QuantConfig, register_quant_config
from pagedserve.model_executor.quantization.gptq import check_bits, check_group_size

if TYPE_CHECKING:
    from torch import nn

    from pagedserve.model_executor.quantization.base import LinearMethod

__all__ = ["AWQConfig"]


def _first(config: Mapping[str, Any], keys: Sequence[str], what: str) -> Any:
    for key in keys:
        if key in config:
            return config[key]
    raise ValueError(f"the AWQ quantization config has no {what} ({' / '.join(keys)})")


@register_quant_config
class AWQConfig(QuantConfig):
    name: ClassVar[str] = "awq"
    aliases: ClassVar[tuple[str, ...]] = ("awq_marlin",)  # vLLM's name of its kernel choice

    def __init__(self, bits: int, group_size: int, zero_point: bool = True,
                 modules_to_not_convert: Sequence[str] | None = None) -> None:
        self.bits = check_bits(bits, "AWQ", (4,))
        self.group_size = check_group_size(group_size, "AWQ", allow_all=False)
        if zero_point is not True:
            raise ValueError(f"AWQ without a zero point (zero_point={zero_point!r}) is not supported")
        self.zero_point = zero_point
        skip = list(modules_to_not_convert or [])
        if not all(isinstance(m, str) for m in skip):
            raise ValueError(f"AWQ modules_to_not_convert must be a list of names, got {skip!r}")
        self.modules_to_not_convert = skip

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AWQConfig:
        version = config.get("version", "gemm")
        if not isinstance(version, str) or version.lower() != "gemm":
            raise ValueError(
                f"AWQ version {version!r} is not supported: only the GEMM layout loads (qweight "
                f"[K, N/8] packed along the output features); the GEMV versions pack qweight "
                f"[N, K/8] for their own kernel. Re-export the checkpoint with version 'gemm'")
        return cls(_first(config, ("w_bit", "bits"), "bits"),
                   _first(config, ("q_group_size", "group_size"), "group size"),
                   config.get("zero_point", True), config.get("modules_to_not_convert"))

    def get_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        from pagedserve.model_executor.quantization.wna16_method import WNA16Format, WNA16LinearMethod

        parts = self.checkpoint_prefixes(prefix)  # gate_up_proj -> gate_proj, up_proj
        skipped = [any(m in p for m in self.modules_to_not_convert) for p in parts]
        if any(skipped) != all(skipped):
            raise ValueError(f"{prefix}: modules_to_not_convert leaves some of {parts} unquantized; "
                             f"a merged layer is quantized whole or not at all")
        if skipped[0]:
            return None
        fmt = WNA16Format("awq", self.bits, self.group_size)
        return WNA16LinearMethod(fmt, layer.kernels, prefix)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"AWQConfig(bits={self.bits}, group_size={self.group_size})"
