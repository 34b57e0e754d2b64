"""The one kernel registry: kernels/ never imports model_executor/ (no cycle, layers depend on
kernels only), the kernel choice lives in no module global, and a BuildContext carries it."""

from __future__ import annotations

import dataclasses
import os
import pkgutil
import subprocess
import sys

import pytest

import pagedserve.kernels
from pagedserve.kernels import reference
from pagedserve.kernels.attention_backend import TORCH_ATTENTION
from pagedserve.kernels.registry import TORCH_KERNELS, KernelSet, available_kernel_sets, get_kernel_set
from pagedserve.model_executor.layers.context import BuildContext, ParallelGroup

KERNEL_MODULES = sorted(m.name for m in pkgutil.walk_packages(pagedserve.kernels.__path__, "pagedserve.kernels."))


def test_kernel_modules_are_found() -> None:
    assert {"pagedserve.kernels.registry", "pagedserve.kernels.attention_backend",
            "pagedserve.kernels.triton.attention"} <= set(KERNEL_MODULES)


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernels_module_does_not_import_model_executor(module: str) -> None:
    if module.startswith("pagedserve.kernels.triton.") and "triton" not in sys.modules:
        pytest.importorskip("triton")
    code = (f"import sys, {module}; bad = [m for m in sys.modules if m.startswith('pagedserve.model_executor')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})


def test_no_module_level_kernel_selection() -> None:
    """Every module-level value in the registry, the layers and the models is a constant: no
    mutable holder (list/dict/set/plain object) of a kernel set or backend, and the old
    selection functions are gone."""
    import importlib

    from pagedserve.kernels import attention_backend, registry

    names = ["pagedserve.model_executor.layers." + m.name for m in pkgutil.iter_modules(
        importlib.import_module("pagedserve.model_executor.layers").__path__)]
    names += ["pagedserve.model_executor.models." + m.name for m in pkgutil.iter_modules(
        importlib.import_module("pagedserve.model_executor.models").__path__)]
    modules = [registry, attention_backend, *(importlib.import_module(n) for n in names)]
    for mod in modules:
        for attr in ("use_kernels", "active_kernels", "_active", "get_attention_backend",
                     "register_attention_backend", "_BACKENDS"):
            assert not hasattr(mod, attr), f"{mod.__name__}.{attr}"
        for name, value in vars(mod).items():
            if isinstance(value, (list, dict, set)) and not name.startswith("__"):
                assert not any(isinstance(v, KernelSet) or getattr(v, "__class__", None) is type(TORCH_ATTENTION)
                               for v in (value.values() if isinstance(value, dict) else value)), f"{mod.__name__}.{name}"
    # The module-level sets are frozen dataclasses: nothing can swap a kernel in them.
    with pytest.raises(dataclasses.FrozenInstanceError):
        TORCH_KERNELS.rms_norm = reference.rms_norm  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TORCH_ATTENTION.attend = reference.paged_attention  # type: ignore[misc]


def test_torch_kernel_set_is_the_reference() -> None:
    ks = get_kernel_set("torch")
    assert ks is TORCH_KERNELS and available_kernel_sets() == ["torch", "triton"]
    assert (ks.rms_norm, ks.fused_add_rms_norm, ks.rotary_embedding, ks.silu_and_mul, ks.argmax_rows) == (
        reference.rms_norm, reference.fused_add_rms_norm, reference.rotary_embedding, reference.silu_and_mul,
        reference.argmax_rows)
    assert ks.attention is TORCH_ATTENTION and ks.attention.write_kv is reference.write_kv_cache
    assert ks.fused_gemv is None and ks.attention.rotary_write_kv is None


def test_build_context_child_prefix_and_placeholders() -> None:
    ctx = BuildContext.create(get_kernel_set("torch"))
    assert ctx.prefix == "" and ctx.quant_config is None and ctx.parallel == ParallelGroup(0, 1)
    child = ctx.child("model").child("layers.0").child("mlp.gate_up_proj")
    assert child.prefix == "model.layers.0.mlp.gate_up_proj" and ctx.prefix == ""
    assert child.kernels is ctx.kernels and child.attention is ctx.attention
    other = dataclasses.replace(TORCH_ATTENTION, name="other")
    assert BuildContext.create(attention=other).attention is other


def test_model_layers_get_their_prefixes() -> None:
    """The loader's context reaches every layer with its module name as prefix."""
    import torch

    from pagedserve.model_executor.layers.linear import LinearBase
    from pagedserve.model_executor.model_spec import ModelSpec
    from pagedserve.model_executor.models.llama import LlamaForCausalLM

    spec = ModelSpec.from_hf({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16,
                              "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
                              "num_hidden_layers": 2, "vocab_size": 40, "max_position_embeddings": 64,
                              "rms_norm_eps": 1e-6, "hidden_act": "silu"})
    with torch.device("cpu"):
        model = LlamaForCausalLM(None, spec=spec, ctx=BuildContext.create())
    prefixes = {name: m.prefix for name, m in model.named_modules() if isinstance(m, LinearBase)}
    assert prefixes and all(name == prefix for name, prefix in prefixes.items())
    assert "model.layers.1.mlp.gate_up_proj" in prefixes
