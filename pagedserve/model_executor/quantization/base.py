"""The quantization seam: a `QuantConfig` picks each linear layer's `LinearMethod` by its prefix.

    cfg = resolve_quant_config(model_dir, spec, requested)   None: unquantized
    ctx = BuildContext(..., quant_config=cfg)                 handed down the module tree
    method = cfg.get_method(layer, "model.layers.3.mlp.gate_up_proj")  None: unquantized

A `LinearMethod` owns a linear layer's parameters (create_weights), the matmul that uses them
(apply) and any repacking once the checkpoint is in (process_weights_after_loading, run by the
loader on every layer after load_weights). Parameters declare how the loader slices them:

    output_dim   the dim that holds output features (sharded by column-parallel layers)
    input_dim    the dim that holds input features (sharded by row-parallel layers)
    packed_dim   the dim along which `pack_factor` logical features share one stored element
                 (int4 x 8 in an int32, say); offsets along it are divided by pack_factor

The checkpoint's method comes from config.json `quantization_config` (read into
ModelSpec.quantization_config by model_spec.py) or from a `quantize_config.json` /
`quant_config.json` beside it; its `quant_method` key names the registered QuantConfig.
`quantization=` (EngineArgs / --quantization) must name the same method, or is refused; on an
unquantized checkpoint it is refused unless the method's `for_unquantized_checkpoint()` gives a
config that quantizes the weights at load time (fp8).

Torch-free at import (config.py validates `quantization=` through it at start-up).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from pagedserve.model_executor.model_spec import ModelSpec

__all__ = [
    "QUANT_CONFIG_FILES",
    "LinearMethod",
    "QuantConfig",
    "find_checkpoint_quant_config",
    "get_quant_config_class",
    "known_quantization_methods",
    "register_quant_config",
    "resolve_quant_config",
]

# Beside config.json, in the order they are trusted (AutoGPTQ, AutoAWQ / others).
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


class LinearMethod(ABC):
    """How one linear layer stores its weight and multiplies by it.

    Fusion: the decoder's small-batch (decode) path may ask apply() to fold the RMSNorm before
    the projection (`norm`, with the residual add) and, for a [gate | up] projection, the
    SiLU-and-mul after it (`gated`). A method says up to how many rows it does so through
    `fused_max_tokens`; 0 (the default) declines, and the layer then runs the norm and the
    activation itself and calls apply(layer, x) plainly, with the same result.
    """

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: Sequence[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        """Register this rank's parameters on `layer` (not the bias: the layer owns it), each with
        its `output_dim` / `input_dim` (None when it has no such dim) and, if packed,
        `packed_dim` / `pack_factor`. `output_partition_sizes` are this rank's logical output
        features of each merged shard (q, k, v / gate, up); `input_size` / `output_size` are the
        whole layer's (all ranks)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: Tensor, *, norm: nn.Module | None = None,
              residual: Tensor | None = None, gated: bool = False) -> Any:
        """x [T, in] -> y [T, out] (+ layer.bias). With `norm` (an RMSNorm: `.weight`, `.eps`),
        only for T <= fused_max_tokens(gated=...): x is rms_norm(x [+ residual]) first and the
        result is (y, x [+ residual]); `gated` also applies SiLU-and-mul, y [T, out / 2]."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 (optional)
        """Repack or convert the loaded parameters (runs once, after every tensor is in)."""

    def fused_max_tokens(self, *, gated: bool) -> int:
        """The most rows apply() fuses the norm (and with `gated`, the SiLU-and-mul) for."""
        return 0


class QuantConfig(ABC):
    """A checkpoint's quantization scheme (GPTQ, AWQ, ...; formats come in their own modules)."""

    name: ClassVar[str]  # the `quant_method` value in checkpoints and the `quantization=` name
    # Other `quantization=` names meaning this method (vLLM's kernel-specific ones: "gptq_marlin").
    aliases: ClassVar[tuple[str, ...]] = ()
    # The model class's merged module -> its checkpoint parts ("qkv_proj" -> q/k/v_proj), set by
    # the loader before the model is built, so get_method can match checkpoint module names.
    packed_modules_mapping: dict[str, list[str]]

    def checkpoint_prefixes(self, prefix: str) -> list[str]:
        """The checkpoint module names behind our layer `prefix`:
        "model.layers.0.self_attn.qkv_proj" -> [...q_proj, ...k_proj, ...v_proj]; itself if unmerged."""
        head, _, last = prefix.rpartition(".")
        parts = getattr(self, "packed_modules_mapping", {}).get(last)
        if not parts:
            return [prefix]
        return [f"{head}.{p}" if head else p for p in parts]

    @classmethod
    @abstractmethod
    def from_config(cls, config: Mapping[str, Any]) -> QuantConfig:
        """Parse the checkpoint's quantization config dict; ValueError on bad values."""

    @classmethod
    def for_unquantized_checkpoint(cls, model_dir: str | None, spec: ModelSpec | None) -> QuantConfig | None:
        """The config to use when `quantization=` names this method but the checkpoint carries no
        quantization config of its own (quantize at load, or keep a GGUF file's blocks). None,
        the default: the method needs a checkpoint quantized with it."""
        return None

    @abstractmethod
    def get_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """The method for the linear layer at `prefix` ("model.layers.3.mlp.gate_up_proj");
        None: this layer stays unquantized."""


_REGISTRY: dict[str, type[QuantConfig]] = {}
# Built-in methods, registered by importing their module on first use (they import torch; this
# module stays torch-free).
_BUILTIN_MODULES: dict[str, str] = {
    "squeezellm": "pagedserve.model_executor.quantization.squeezellm",
    "gguf": "pagedserve.model_executor.quantization.gguf_quant",
}


def register_quant_config(cls: type[QuantConfig]) -> type[QuantConfig]:
    """Class decorator: make `cls` selectable by its `name` (and its `aliases`)."""
    for name in (cls.name, *cls.aliases):
        name = name.lower()
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"quantization method {name!r} is already registered")
        _REGISTRY[name] = cls
    return cls


def known_quantization_methods() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def get_quant_config_class(name: str) -> type[QuantConfig]:
    if name.lower() not in _REGISTRY and name.lower() in _BUILTIN_MODULES:
        import importlib

        importlib.import_module(_BUILTIN_MODULES[name.lower()])  # registers it
    cls = _REGISTRY.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown quantization method {name!r}; known methods: "
                         f"{known_quantization_methods()}")
    return cls


def _same_method(a: str, b: str) -> bool:
    """Whether two method names mean the same registered method (an alias is its method)."""
    a, b = a.lower(), b.lower()
    return a == b or (a in _REGISTRY and _REGISTRY[a] is _REGISTRY.get(b))


def find_checkpoint_quant_config(model_dir: str | None,
                                 spec_config: Mapping[str, Any] | None) -> tuple[dict[str, Any], str] | None:
    """(the checkpoint's quantization config dict, where it was found), or None."""
    if spec_config:
        return dict(spec_config), "config.json quantization_config"
    if model_dir is not None:
        for name in QUANT_CONFIG_FILES:
            path = Path(model_dir) / name
            if path.is_file():
                data = json.loads(path.read_text())
                if not isinstance(data, dict):
                    raise ValueError(f"{path} must hold a JSON object")
                return data, name
    return None


def resolve_quant_config(model_dir: str | None, spec: ModelSpec | None,
                         requested: str | None) -> QuantConfig | None:
    """The QuantConfig the model is built with: the checkpoint's, which `requested` (the user's
    `quantization=`, None = take the checkpoint's) must agree with; on an unquantized checkpoint,
    the requested method's `for_unquantized_checkpoint()` (refused when None). None: unquantized."""
    found = find_checkpoint_quant_config(model_dir, spec.quantization_config if spec else None)
    if found is None:
        if requested is not None:
            config = get_quant_config_class(requested).for_unquantized_checkpoint(model_dir, spec)
            if config is not None:
                return config
            raise ValueError(
                f"quantization={requested!r} was requested, but checkpoint {model_dir!r} is not "
                f"quantized (no quantization_config in config.json, no "
                f"{' / '.join(QUANT_CONFIG_FILES)})")
        return None
    data, where = found
    method = data.get("quant_method")
    if method is None:
        if requested is None:
            raise ValueError(f"the checkpoint's {where} names no quant_method; pass quantization= "
                             f"(known methods: {known_quantization_methods()})")
        method = requested
    if not isinstance(method, str):
        raise ValueError(f"quant_method in the checkpoint's {where} must be a string, got {method!r}")
    if requested is not None and not _same_method(requested, method):
        raise ValueError(f"quantization={requested!r} was requested, but checkpoint {model_dir!r} "
                         f"is quantized with {method!r} ({where})")
    return get_quant_config_class(method).from_config(data)
