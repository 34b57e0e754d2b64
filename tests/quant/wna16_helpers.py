"""Shared by test_gptq.py and test_awq.py: the tiny checkpoint the packers quantize, the
weight-level check (every quantized layer decodes to exactly the packer's values) and the
greedy comparison through `pagedserve.LLM` against the float32 model holding those values."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from pagedserve.kernels.reference_quant import WNA16Weight, dequantize_wna16
from pagedserve.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from pagedserve.model_executor.loader import LoadedModel, load_model
from pagedserve.model_executor.quantization.wna16_method import WNA16LinearMethod
from pagedserve.testing.checkpoints import build_checkpoint
from pagedserve.testing.quant_pack import write_dequantized_checkpoint
from tests.engine.engine_helpers import greedy, make_prompts
from tests.models.test_tensor_parallel import _run_tp, _steps, run_steps

# Every K (hidden 128, q/o 4 x 32 = 128, intermediate 256) is a multiple of each group size 32,
# 64 and 128; 2 KV heads, so tp = 2 splits k / v.
WIDE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32)
PROJECTIONS = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_checkpoint(str(tmp_path_factory.mktemp("wna16") / "llama"), "llama", **WIDE)


def load(path: str | Path, **kw: Any) -> LoadedModel:
    return load_model(str(path), torch.float32, "cpu", show_progress=False, **kw)


def linears(model: Any) -> dict[str, LinearBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}


def layer_weight(layer: LinearBase) -> Tensor:
    """The quantized layer's weight as [N, K] in the original input order, from its WNA16Weight."""
    w = layer.wna16_weight
    assert isinstance(w, WNA16Weight)  # the torch kernels keep the canonical layout
    stored = dequantize_wna16(w)  # [K, N], rows in w.perm's order
    if w.perm is None:
        return stored.t()
    original = torch.empty_like(stored)
    original[w.perm] = stored
    return original.t()


def assert_layers_equal_packer(loaded: LoadedModel, dequantized: dict[str, Tensor],
                               unquantized: Collection[str] = ()) -> None:
    """Layers in `unquantized` (our prefixes) hold their float weight; every other projection is
    quantized and decodes exactly to the packer's weights (merged shards concatenated)."""
    cfg = loaded.quant_config
    assert cfg is not None
    layers = linears(loaded.model)
    expected_names = {f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert set(layers) == expected_names  # lm_head is no LinearBase: it stays unquantized
    for name, layer in layers.items():
        want = torch.cat([dequantized[f"{p}.weight"] for p in cfg.checkpoint_prefixes(name)])
        if name in unquantized:
            assert isinstance(layer.linear_method, UnquantizedLinearMethod), name
            assert torch.equal(layer.weight, want), name
            continue
        assert isinstance(layer.linear_method, WNA16LinearMethod), name
        assert not hasattr(layer, "qweight")  # the published copies are dropped after conversion
        assert torch.equal(layer_weight(layer), want), name
    assert loaded.model.lm_head.weight.dtype == torch.float32


def greedy_tokens(path: str, quantization: str | None = None, tensor_parallel_size: int = 1) -> list[list[int]]:
    from pagedserve import LLM

    llm = LLM(model=path, dtype="float32", max_model_len=256, kv_cache_memory_bytes=16 << 20,
              quantization=quantization, tensor_parallel_size=tensor_parallel_size)
    try:
        prompts = make_prompts(400, seed=5, lengths=(1, 9, 30, 61))
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(12), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()  # tp > 1: the gloo worker processes
    return [list(o.outputs[0].token_ids) for o in outs]


def assert_greedy_equals_dequantized(src: str, quant_dir: Path, dequantized: dict[str, Tensor],
                                     quantization: str | None = None, tensor_parallel_size: int = 1) -> None:
    """The quantized checkpoint (at `tensor_parallel_size`) gives the greedy tokens of the
    float32 checkpoint holding the dequantized weights (one rank)."""
    plain = quant_dir.parent / f"{quant_dir.name}-float"
    write_dequantized_checkpoint(src, plain, dequantized)
    got = greedy_tokens(str(quant_dir), quantization, tensor_parallel_size)
    assert all(len(t) == 12 for t in got)
    assert got == greedy_tokens(str(plain))


def assert_tp2_logits_equal_tp1(path: Path) -> None:
    """Two ranks (threads) each loading their slice give one rank's logits, step by step."""
    one = load(path).model
    steps = _steps(one.spec.vocab_size)
    want = run_steps(one, steps)
    per_rank, _ = _run_tp(str(path), 2, steps)
    for got in per_rank:
        for g, w in zip(got, want, strict=True):
            for req in w:
                torch.testing.assert_close(g[req], w[req], atol=1e-4, rtol=1e-4)
