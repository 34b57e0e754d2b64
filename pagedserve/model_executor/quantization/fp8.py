"""FP8 (e4m3) checkpoints in vLLM's "fp8" format, and `quantization="fp8"` on an unquantized model.

config.json (no compressed-tensors):

    "quantization_config": {"quant_method": "fp8", "activation_scheme": "static" | "dynamic",
                            "ignored_layers": ["lm_head", "model.layers.0.mlp.down_proj", ...]}

Tensors of a quantized module X (checkpoint module names; q/k/v and gate/up are separate shards):

    X.weight        float8_e4m3fn [out, in]        w[r, c] ~= weight[r, c] * scale[r]
    X.weight_scale  float32 [] or [1]  (per tensor) | [out] or [out, 1]  (per output channel)
    X.input_scale   float32 [] or [1]  (static activation scheme only): x ~= e4m3(x / s) * s

Modules named in `ignored_layers` (or all of whose shards are) keep their unquantized weights;
a merged layer whose shards disagree is refused. On an unquantized checkpoint `quantization="fp8"`
builds the config of `for_unquantized_checkpoint()`: every projection is loaded in the model dtype
and quantized to e4m3 at load time with one scale per tensor (this rank's merged weight), and the
activations are dynamic. The linear method itself (torch) is in fp8_linear.py, imported by
get_method, so that registering the method keeps this package torch-free at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pagedserve.model_executor.quantization.base import LinearMethod, QuantConfig, register_quant_config

if TYPE_CHECKING:
    from torch import nn

    from pagedserve.model_executor.model_spec import ModelSpec

__all__ = ["ACTIVATION_SCHEMES", "Fp8Config"]

ACTIVATION_SCHEMES = ("static", "dynamic")


@register_quant_config
class Fp8Config(QuantConfig):
    name: ClassVar[str] = "fp8"

    def __init__(self, *, serialized: bool, activation_scheme: str = "dynamic",
                 ignored_layers: Sequence[str] = ()) -> None:
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"fp8 activation_scheme must be one of {list(ACTIVATION_SCHEMES)}, "
                             f"got {activation_scheme!r}")
        if not serialized and activation_scheme == "static":
            raise ValueError("fp8 quantization at load time has no calibrated input scales: "
                             "the static activation scheme needs an fp8 checkpoint")
        self.serialized = serialized  # True: the checkpoint holds e4m3 weights and their scales
        self.activation_scheme = activation_scheme
        self.ignored_layers = frozenset(ignored_layers)

    @property
    def static_activations(self) -> bool:
        return self.activation_scheme == "static"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Fp8Config:
        if config.get("weight_block_size") is not None:
            raise ValueError("block-wise FP8 checkpoints (quantization_config weight_block_size "
                             f"{config['weight_block_size']!r}) are not supported; per-tensor and "
                             "per-channel weight scales are")
        scheme = config.get("activation_scheme", "dynamic")
        ignored = config.get("ignored_layers") or []
        if not isinstance(ignored, list) or not all(isinstance(n, str) for n in ignored):
            raise ValueError(f"fp8 ignored_layers must be a list of module names, got {ignored!r}")
        return cls(serialized=True, activation_scheme=scheme, ignored_layers=ignored)

    @classmethod
    def for_unquantized_checkpoint(cls, model_dir: str | None, spec: ModelSpec | None) -> Fp8Config:
        del model_dir, spec  # any unquantized bf16 / fp16 / fp32 checkpoint
        return cls(serialized=False, activation_scheme="dynamic")

    def get_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        parts = self.checkpoint_prefixes(prefix)  # qkv_proj -> q_proj, k_proj, v_proj
        skipped = [prefix in self.ignored_layers or p in self.ignored_layers for p in parts]
        if any(skipped) and not all(skipped):
            left = [p for p, s in zip(parts, skipped, strict=True) if not s]
            raise ValueError(f"{prefix}: fp8 ignored_layers names some of its merged shards {parts} "
                             f"but not {left}; they share one weight and must be all or none")
        if all(skipped):
            return None
        from pagedserve.model_executor.quantization.fp8_linear import Fp8LinearMethod

        return Fp8LinearMethod(self, getattr(layer, "kernels", None))

    def __repr__(self) -> str:
        return (f"Fp8Config(serialized={self.serialized}, activation_scheme={self.activation_scheme!r}, "
                f"ignored_layers={sorted(self.ignored_layers)})")
