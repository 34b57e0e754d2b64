"""GPTQ checkpoints packed by the test packer (pagedserve.testing.quant_pack.gptq) load as
published: for every option the layers decode exactly to the packer's weights, the greedy
tokens equal the float32 model holding them, tensor parallel matches one rank, and bad configs
are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pagedserve import EngineArgs
from pagedserve.kernels.registry import TORCH_KERNELS
from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.linear import MergedColumnParallelLinear
from pagedserve.model_executor.quantization.base import known_quantization_methods
from pagedserve.model_executor.quantization.gptq import GPTQConfig
from pagedserve.model_executor.quantization.wna16_method import WNA16LinearMethod
from pagedserve.testing.quant_pack import quantize_checkpoint, write_dequantized_checkpoint
from pagedserve.testing.quant_pack.gptq import gptq_config, gptq_quantizer
from tests.models.test_tensor_parallel import _run_tp, _steps, run_steps
from tests.quant.wna16_helpers import (
    assert_greedy_equals_dequantized,
    assert_layers_equal_packer,
    assert_tp2_logits_equal_tp1,
    layer_weight,
    linears,
    load,
    wide_checkpoint,
)

__all__ = ["wide_checkpoint"]  # the fixture, imported for pytest

# (bits, group_size, sym, desc_act, checkpoint_format): every bits x group, each other option
# on both bit widths and several groups
CASES = [*((b, g, True, False, "gptq") for b in (4, 8) for g in (32, 64, 128, -1)),
         (4, 32, False, False, "gptq"), (8, 64, False, False, "gptq"),
         (4, 128, False, False, "gptq_v2"), (8, -1, False, False, "gptq_v2"),
         (4, 64, True, False, "gptq_v2"),
         (4, 32, True, True, "gptq"), (8, 128, False, True, "gptq_v2"), (4, 64, False, True, "gptq"),
         (8, 32, True, True, "gptq")]


def _pack(src: str, dst: Path, bits: int, group: int, sym: bool, desc_act: bool, fmt: str,
          **kw: Any) -> dict[str, torch.Tensor]:
    opts = dict(sym=sym, desc_act=desc_act, checkpoint_format=fmt)
    return quantize_checkpoint(src, dst, gptq_quantizer(bits, group, **opts, dynamic=kw.get("dynamic")),
                               gptq_config(bits, group, **opts, **kw))


@pytest.mark.parametrize(("bits", "group", "sym", "desc_act", "fmt"), CASES)
def test_layers_decode_to_the_packed_values(wide_checkpoint: str, tmp_path: Path, bits: int, group: int,
                                            sym: bool, desc_act: bool, fmt: str) -> None:
    deq = _pack(wide_checkpoint, tmp_path / "q", bits, group, sym, desc_act, fmt)
    loaded = load(tmp_path / "q")
    assert isinstance(loaded.quant_config, GPTQConfig)
    assert_layers_equal_packer(loaded, deq)
    qkv = linears(loaded.model)["model.layers.0.self_attn.qkv_proj"]
    w = qkv.wna16_weight
    assert (w.bits, w.group_size) == (bits, 128 if group == -1 else group)
    # act-order: rows sorted by group once, x permuted (nothing to sort with one group, K = 128)
    assert (w.perm is not None) == (desc_act and group < 128)


def test_autogptq_quantize_config_file_and_dynamic_rules(wide_checkpoint: str, tmp_path: Path) -> None:
    # quantize_config.json without quant_method: the user names the method (an alias works too)
    deq = quantize_checkpoint(wide_checkpoint, tmp_path / "a", gptq_quantizer(4, 64, sym=False),
                              gptq_config(4, 64, sym=False, autogptq_file=True),
                              config_location="quantize_config.json")
    with pytest.raises(ValueError, match="names no quant_method; pass quantization="):
        load(tmp_path / "a")
    for name in ("gptq", "GPTQ_Marlin"):
        assert_layers_equal_packer(load(tmp_path / "a", quantization=name), deq)
    # GPTQ-for-LLaMa's checkpoints store an all-zero bias for every layer: skipped, a real one not
    file = tmp_path / "a" / "model.safetensors"
    tensors = load_file(str(file))
    for module in {k.rpartition(".")[0] for k in tensors if k.endswith(".qweight")}:
        tensors[f"{module}.bias"] = torch.zeros(tensors[f"{module}.scales"].shape[1], dtype=torch.float16)
    save_file(tensors, str(file))
    assert_layers_equal_packer(load(tmp_path / "a", quantization="gptq"), deq)
    tensors["model.layers.0.mlp.down_proj.bias"][3] = 1.0
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.down_proj.bias' matches no model parameter"):
        load(tmp_path / "a", quantization="gptq")
    # GPTQModel's dynamic: layer 1's MLP left unquantized, layer 0's down_proj 8-bit in groups of 32
    dynamic = {r"-:model\.layers\.1\.mlp\..*": {}, r"+:.*\.0\.mlp\.down_proj": {"bits": 8, "group_size": 32}}
    deq = _pack(wide_checkpoint, tmp_path / "d", 4, 128, True, False, "gptq_v2", dynamic=dynamic)
    loaded = load(tmp_path / "d")
    assert_layers_equal_packer(loaded, deq, unquantized={"model.layers.1.mlp.gate_up_proj",
                                                         "model.layers.1.mlp.down_proj"})
    down = linears(loaded.model)["model.layers.0.mlp.down_proj"].wna16_weight
    assert (down.bits, down.group_size) == (8, 32)
    # Optimum's modules_in_block_to_quantize: o_proj and down_proj not listed, left unquantized
    steps = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["mlp.up_proj", "mlp.gate_proj"]]
    deq = quantize_checkpoint(wide_checkpoint, tmp_path / "m",
                              gptq_quantizer(8, 64, modules_in_block_to_quantize=[m for s in steps for m in s]),
                              gptq_config(8, 64, modules_in_block_to_quantize=steps))
    assert_layers_equal_packer(load(tmp_path / "m"), deq, unquantized={
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")})


@pytest.mark.parametrize(("bits", "group", "sym", "desc_act", "fmt"),
                         [(4, 128, False, True, "gptq"), (8, 64, True, False, "gptq_v2")])
def test_greedy_equals_float_model_of_the_dequantized_weights(wide_checkpoint: str, tmp_path: Path, bits: int,
                                                              group: int, sym: bool, desc_act: bool,
                                                              fmt: str) -> None:
    deq = _pack(wide_checkpoint, tmp_path / "q", bits, group, sym, desc_act, fmt)
    assert_greedy_equals_dequantized(wide_checkpoint, tmp_path / "q", deq)


@pytest.mark.parametrize("group", [32, -1])  # sharded groups; one group every rank keeps whole
def test_tensor_parallel_matches_one_rank(wide_checkpoint: str, tmp_path: Path, group: int) -> None:
    _pack(wide_checkpoint, tmp_path / "q", 4, group, False, False, "gptq")
    assert_tp2_logits_equal_tp1(tmp_path / "q")


def test_act_order_split_across_ranks_is_refused(wide_checkpoint: str, tmp_path: Path) -> None:
    _pack(wide_checkpoint, tmp_path / "q", 4, 32, True, True, "gptq")
    with pytest.raises(ValueError, match="act-order groups are split across the tensor-parallel ranks"):
        _run_tp(str(tmp_path / "q"), 2, [])


def test_fused_norm_and_gated_apply_equal_the_unfused_path(wide_checkpoint: str, tmp_path: Path) -> None:
    """The method's apply with the decode fusion (norm before, SiLU-and-mul after) equals
    the norm, the plain apply and the activation run apart (a kernel set may enable it)."""
    from pagedserve.kernels import reference as ref

    cfg = GPTQConfig(4, 32, desc_act=True, sym=False)
    cfg.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    ctx = BuildContext.create(TORCH_KERNELS, quant_config=cfg).child("model.layers.0.mlp.gate_up_proj")
    layer = MergedColumnParallelLinear(64, [96, 96], ctx=ctx)
    assert isinstance(layer.linear_method, WNA16LinearMethod)
    assert layer.linear_method.fused_max_tokens(gated=True) == 0  # the torch set declines
    quantize = gptq_quantizer(4, 32, sym=False, desc_act=True)
    g = torch.Generator().manual_seed(0)
    parts = {}
    for shard, name in enumerate(("gate_proj", "up_proj")):
        q = quantize(f"model.layers.0.mlp.{name}", torch.randn(96, 64, generator=g))
        parts[name] = q.dequantized
        for suffix, tensor in q.tensors.items():
            param = getattr(layer, suffix)
            param.weight_loader(param, tensor, shard)
    layer.linear_method.process_weights_after_loading(layer)
    assert torch.equal(layer_weight(layer), torch.cat([parts["gate_proj"], parts["up_proj"]]))
    norm = nn.Module()
    norm.weight, norm.eps = nn.Parameter(torch.rand(64, generator=g) + 0.5), 1e-5
    x, residual = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    y, new_residual = layer.linear_method.apply(layer, x, norm=norm, residual=residual, gated=True)
    h, want_residual = ref.fused_add_rms_norm(x, residual, norm.weight, 1e-5)
    torch.testing.assert_close(y, ref.silu_and_mul(layer(h)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_residual, want_residual)


def test_bad_configs_are_refused(wide_checkpoint: str, tmp_path: Path) -> None:
    good = gptq_config(4, 128)
    for change, message in [({"bits": 3}, r"GPTQ bits must be one of \[4, 8\], got 3"),
                            ({"bits": "4"}, "GPTQ bits must be one of"),
                            ({"group_size": 0}, "GPTQ group_size must be a positive integer or -1, got 0"),
                            ({"group_size": -2}, "got -2"),
                            ({"group_size": 64.0}, "got 64.0"),
                            ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
                            ({"lm_head": True}, "quantizes lm_head"),
                            ({"desc_act": "yes"}, "desc_act must be true or false"),
                            ({"dynamic": {"+:.*down_proj": {"bits": 2}}}, r"dynamic '\+:\.\*down_proj'.* bits"),
                            ({"dynamic": {"-:(": {}}}, "is not a valid regex"),
                            ({"modules_in_block_to_quantize": 3}, "must be a list of module names"),
                            ({"modules_in_block_to_quantize": [["mlp.up_proj", 1]]}, "got \\[\\['mlp")]:
        with pytest.raises(ValueError, match=message):
            GPTQConfig.from_config({**good, **change})
    # a group size that does not divide the layer's inputs (K = 128): refused at build time
    deq_dir = tmp_path / "g"
    quantize_checkpoint(wide_checkpoint, deq_dir, gptq_quantizer(4, 64), gptq_config(4, 64))
    cfg = json.loads((deq_dir / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 96
    (deq_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="128 input features are not a multiple of group_size 96"):
        load(deq_dir)


def test_names_and_contradictions(wide_checkpoint: str, tmp_path: Path) -> None:
    assert {"gptq", "gptq_marlin", "awq", "awq_marlin"} <= set(known_quantization_methods())
    _pack(wide_checkpoint, tmp_path / "q", 4, 128, True, False, "gptq")
    EngineArgs(model=str(tmp_path / "q"), quantization="gptq_marlin").create_engine_config()  # agrees
    with pytest.raises(ValueError, match=r"quantization='awq' was requested.*quantized with 'gptq'"):
        EngineArgs(model=str(tmp_path / "q"), quantization="awq").create_engine_config()


def test_biased_family_logits_equal_the_dequantized_model(tiny_checkpoints: Any, tmp_path: Path) -> None:
    """qwen2 (q/k/v biases, sliding window): the paged model's logits through prefill, chunked
    prefill and decode equal the float32 model holding the dequantized weights."""
    src = tiny_checkpoints["qwen2"]
    deq = _pack(src, tmp_path / "q", 4, 32, False, True, "gptq")
    write_dequantized_checkpoint(src, tmp_path / "f", deq)
    quantized = load(tmp_path / "q").model
    steps = _steps(quantized.spec.vocab_size)
    got, want = run_steps(quantized, steps), run_steps(load(tmp_path / "f").model, steps)
    for g, w in zip(got, want, strict=True):
        for req in w:
            torch.testing.assert_close(g[req], w[req], atol=1e-4, rtol=1e-4)


def test_merged_shards_with_different_act_orders_are_refused() -> None:
    cfg = GPTQConfig(4, 32, desc_act=True, sym=True)
    cfg.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    ctx = BuildContext.create(TORCH_KERNELS, quant_config=cfg).child("model.layers.0.mlp.gate_up_proj")
    layer = MergedColumnParallelLinear(64, [32, 32], ctx=ctx)
    quantize = gptq_quantizer(4, 32, desc_act=True)
    # different modules' names draw different permutations (gate/up share one; these do not)
    first = quantize("model.layers.0.mlp.gate_proj", torch.randn(32, 64)).tensors["g_idx"]
    other = quantize("model.layers.0.self_attn.o_proj", torch.randn(32, 64)).tensors["g_idx"]
    assert not torch.equal(first, other)
    g_idx = layer.g_idx
    g_idx.weight_loader(g_idx, first, 0)
    g_idx.weight_loader(g_idx, first, 1)  # equal: fine
    with pytest.raises(ValueError, match="have different g_idx"):
        g_idx.weight_loader(g_idx, other, 1)


@pytest.mark.parametrize("desc_act", [False, True])
def test_tensor_core_int4_kernel_in_a_bf16_model(wide_checkpoint: str, tmp_path: Path, desc_act: bool) -> None:
    """A bf16 model of 4-bit GPTQ on the Triton WNA16 kernels (interpreted on CPU) takes the
    tensor-core kernel's layout for every layer (integer zeros) and gives the torch path's logits
    within bf16 rounding: prefill chunks and decode steps, the norm and act-order prologue, the
    gated epilogue. Bounds: the torch path in bf16 differs from the float32 model by up to 4.4%
    of the largest |logit| (1.0% on average) here; the kernel from the torch path by up to 6.5%
    (1.6% on average, in the decode step: the interpreter rounds the scaled bf16 weights toward
    zero, the GPU to nearest). A wrong layout or scale is off by the logits' own size."""
    pytest.importorskip("triton")
    import dataclasses

    from pagedserve.kernels.triton.wna16 import wna16_fused_max_tokens, wna16_matmul, wna16_prepare
    from pagedserve.model_executor.loader import load_model

    _pack(wide_checkpoint, tmp_path / "q", 4, 32, False, desc_act, "gptq")
    kernels = dataclasses.replace(TORCH_KERNELS, wna16_prepare=wna16_prepare, wna16_matmul=wna16_matmul,
                                  wna16_fused_max_tokens=wna16_fused_max_tokens)
    plain: Any = load_model(str(tmp_path / "q"), torch.bfloat16, "cpu", show_progress=False).model
    fast: Any = load_model(str(tmp_path / "q"), torch.bfloat16, "cpu", show_progress=False, kernels=kernels).model
    prepared = [m.wna16_weight for m in fast.modules() if hasattr(m, "wna16_weight")]
    assert prepared and all(w.mma_block_k == 32 for w in prepared)
    assert any(w.perm is not None for w in prepared) == desc_act
    steps = _steps(plain.spec.vocab_size)[:3]  # prefills of 19-21 rows, one decode step of 3
    for g, w in zip(run_steps(fast, steps), run_steps(plain, steps), strict=True):
        for req in w:
            diff = (g[req].float() - w[req].float()).abs()
            scale = w[req].float().abs().max().item()
            assert diff.max().item() <= 0.1 * scale and diff.mean().item() <= 0.025 * scale
