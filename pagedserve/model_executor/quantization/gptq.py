"""GPTQ checkpoints (AutoGPTQ / GPTQModel / Optimum), read as published.

The quantization config (config.json `quantization_config`, or `quantize_config.json`):

    bits               4 or 8
    group_size         input rows per scale / zero: a positive divisor of every layer's K, or -1
    desc_act           act-order: g_idx unsorted (the rows are sorted by group at load)
    sym                symmetric (zero = 2**(bits-1)); the zeros are stored either way
    checkpoint_format  "gptq" (default; qzeros hold zero - 1) or "gptq_v2" (the zero itself);
                       older GPTQModel writes it as `format`
    lm_head            true: a quantized lm_head, refused (ours stays unquantized)
    modules_in_block_to_quantize  Optimum's list (or list of lists) of the block's modules that
                       are quantized ("self_attn.q_proj", ...); the others stay unquantized
    dynamic            GPTQModel's per-module rules, first match wins: "-:<regex>" leaves the
                       matching modules unquantized, "+:<regex>" (or a bare regex) overrides
                       bits / group_size / desc_act / sym for them; matched (re.match) against
                       the checkpoint module name ("model.layers.0.mlp.down_proj")

The tensors and their conversion are in wna16_method.py. Torch-free at import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pagedserve.model_executor.quantization.base import QuantConfig, register_quant_config

if TYPE_CHECKING:
    from torch import nn

    from pagedserve.model_executor.quantization.base import LinearMethod

__all__ = ["GPTQConfig"]

GPTQ_BITS = (4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_OVERRIDABLE = ("bits", "group_size", "desc_act", "sym")


def check_group_size(value: Any, method: str, allow_all: bool = True) -> int:
    """A group size as the config holds it: a positive int, or -1 (one group) if allow_all."""
    if isinstance(value, bool) or not isinstance(value, int) or not (value > 0 or (allow_all and value == -1)):
        allowed = "a positive integer or -1" if allow_all else "a positive integer"
        raise ValueError(f"{method} group_size must be {allowed}, got {value!r}")
    return value


def check_bits(value: Any, method: str, allowed: tuple[int, ...]) -> int:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{method} bits must be one of {list(allowed)}, got {value!r}")
    return int(value)


def _flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"GPTQ {key} must be true or false, got {value!r}")
    return value


@register_quant_config
class GPTQConfig(QuantConfig):
    name: ClassVar[str] = "gptq"
    aliases: ClassVar[tuple[str, ...]] = ("gptq_marlin",)  # vLLM's name of its kernel choice

    def __init__(self, bits: int, group_size: int, desc_act: bool, sym: bool,
                 checkpoint_format: str = "gptq",
                 dynamic: Mapping[str, Mapping[str, Any]] | None = None,
                 modules_in_block_to_quantize: list[str] | None = None) -> None:
        self.bits = check_bits(bits, "GPTQ", GPTQ_BITS)
        self.group_size = check_group_size(group_size, "GPTQ")
        self.desc_act, self.sym = desc_act, sym
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported "
                             f"(supported: {list(CHECKPOINT_FORMATS)})")
        self.checkpoint_format = checkpoint_format
        self.modules_in_block = list(modules_in_block_to_quantize or [])  # empty: all of them
        # (excluded, compiled pattern, overrides), in the config's order
        self.dynamic: list[tuple[bool, re.Pattern[str], dict[str, Any]]] = []
        for key, overrides in (dynamic or {}).items():
            if not isinstance(key, str) or not isinstance(overrides, Mapping):
                raise ValueError(f"GPTQ dynamic must map regex strings to objects, got {key!r}: "
                                 f"{overrides!r}")
            excluded = key.startswith("-:")
            pattern = key[2:] if excluded or key.startswith("+:") else key
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"GPTQ dynamic rule {key!r} is not a valid regex: {exc}") from exc
            picked = {k: overrides[k] for k in _OVERRIDABLE if k in overrides}
            if not excluded:  # validated now, not when the layer is built
                check_bits(picked.get("bits", self.bits), f"GPTQ dynamic {key!r}", GPTQ_BITS)
                check_group_size(picked.get("group_size", self.group_size), f"GPTQ dynamic {key!r}")
            self.dynamic.append((excluded, compiled, picked))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GPTQConfig:
        if "bits" not in config:
            raise ValueError("the GPTQ quantization config has no 'bits'")
        if config.get("lm_head"):
            raise ValueError("this GPTQ checkpoint quantizes lm_head, which is not supported "
                             "(lm_head must stay unquantized)")
        fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
        if not isinstance(fmt, str):
            raise ValueError(f"GPTQ checkpoint_format must be a string, got {fmt!r}")
        dynamic = config.get("dynamic") or {}
        if not isinstance(dynamic, Mapping):
            raise ValueError(f"GPTQ dynamic must be an object, got {dynamic!r}")
        in_block = config.get("modules_in_block_to_quantize") or []
        flat = [m for entry in in_block for m in (entry if isinstance(entry, list) else [entry])] \
            if isinstance(in_block, list) else [in_block]
        if not isinstance(in_block, list) or not all(isinstance(m, str) for m in flat):
            raise ValueError(f"GPTQ modules_in_block_to_quantize must be a list of module names "
                             f"(or of lists of them), got {in_block!r}")
        return cls(config["bits"], config.get("group_size", -1), _flag(config, "desc_act", False),
                   _flag(config, "sym", True), fmt.lower(), dynamic, flat)

    def _rule(self, module: str) -> dict[str, Any] | None:
        """This checkpoint module's settings, or None: left unquantized (by a "-:" rule, or not
        in modules_in_block_to_quantize)."""
        if self.modules_in_block and not any(module == m or module.endswith(f".{m}")
                                             for m in self.modules_in_block):
            return None
        settings = {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act,
                    "sym": self.sym}
        for excluded, pattern, overrides in self.dynamic:
            if pattern.match(module):
                if excluded:
                    return None
                settings.update(overrides)
                break
        return settings

    def get_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        from pagedserve.model_executor.quantization.wna16_method import WNA16Format, WNA16LinearMethod

        parts = self.checkpoint_prefixes(prefix)  # qkv_proj -> q_proj, k_proj, v_proj
        rules = [self._rule(p) for p in parts]
        if any(r != rules[0] for r in rules):
            raise ValueError(f"{prefix}: GPTQ dynamic rules treat its parts {parts} differently; "
                             f"a merged layer needs one setting")
        rule = rules[0]
        if rule is None:
            return None
        fmt = WNA16Format("gptq", int(rule["bits"]), int(rule["group_size"]), bool(rule["desc_act"]),
                          zero_minus_one=self.checkpoint_format == "gptq")
        return WNA16LinearMethod(fmt, layer.kernels, prefix)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (f"GPTQConfig(bits={self.bits}, group_size={self.group_size}, "
                f"desc_act={self.desc_act}, sym={self.sym}, format={self.checkpoint_format!r})")
