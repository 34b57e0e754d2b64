"""GGUF files loaded with quantization="gguf": projections keep their raw blocks (Q/K rows
un-permuted by whole rows), decode to exactly the dequantized-at-load weights, mixed-type merged
projections split into runs, other types fall back to dequantize-at-load, and the greedy tokens
equal those of the same file loaded dequantized."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast
from unittest import mock

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (a declared dependency) is not installed")

from pagedserve import LLM, SamplingParams  # noqa: E402
from pagedserve.kernels.reference_gguf import GGUF_BLOCKS, GGUFWeight, dequantize_gguf  # noqa: E402
from pagedserve.model_executor.loader import load_model  # noqa: E402
from pagedserve.model_executor.quantization.gguf_quant import (  # noqa: E402
    GGUFConfig,
    GGUFLinearMethod,
    auto_gguf_config,
    dequantized_bytes,
)
from pagedserve.testing import gguf_files  # noqa: E402
from pagedserve.testing.checkpoints import build_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("qtype", list(GGUF_BLOCKS) + ["Q5_K"])
def test_twin_equals_the_gguf_package(qtype: str) -> None:
    raw = gguf_files.random_block_bytes(qtype, 3, 512, seed=3)
    want = np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]), np.float32)
    if qtype not in GGUF_BLOCKS:
        with pytest.raises(KeyError):
            dequantize_gguf(GGUFWeight(torch.from_numpy(raw), qtype, 512))
        return
    got = dequantize_gguf(GGUFWeight(torch.from_numpy(raw), qtype, 512))
    assert torch.equal(got, torch.from_numpy(want))  # bit for bit


def tamed_blocks(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid K-quant blocks of a plausible weight: uniform random quants around zero, scales
    that keep every value within ~0.1 (random_block_bytes keeps bytes below 0x3C, which would
    leave the high nibbles in 0..3 and give the weight a large structured mean)."""
    rng = np.random.default_rng(seed)
    raw = gguf_files.random_block_bytes(qtype, rows, cols, seed)
    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    blocks = raw.reshape(-1, size)
    n = blocks.shape[0]
    if qtype == "Q6_K":  # ql | qh random, int8 scales in [-20, 20], d
        blocks[:, 0:192] = rng.integers(0, 256, (n, 192), dtype=np.uint8)
        blocks[:, 192:208] = rng.integers(-20, 21, (n, 16)).astype(np.int8).view(np.uint8)
        blocks[:, 208:210] = np.array([2e-4], np.float16).view(np.uint8)
    else:  # Q4_K / Q5_K: every sub-block scale and min 8; d * 8 * (q - 7.5) with dmin = 7.5 d
        blocks[:, 0:2] = np.array([1e-3], np.float16).view(np.uint8)
        blocks[:, 2:4] = np.array([7.5e-3], np.float16).view(np.uint8)
        blocks[:, 4:12] = 8
        blocks[:, 12:16] = 8 << 4 | 8
        blocks[:, 16:] = rng.integers(0, 256, (n, size - 16), dtype=np.uint8)
    return raw


# GGUF tensor stem -> type, like a Q4_K_M file: v and down in Q6_K; one Q5_K (no kernel: falls back)
KQUANT_TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
                "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}


def write_kquant_file(hf: Any, path: str) -> str:
    """write_gguf_from_hf's file (metadata, names, permutation) with K-quant blocks swapped in."""
    captured: dict[str, Any] = {}

    def capture(path: str, tensors: Any, arch: str = "llama", metadata: Any = None) -> str:
        captured.update(tensors=list(tensors), arch=arch, metadata=metadata)
        return path

    with mock.patch.object(gguf_files, "write_tensors", capture):
        gguf_files.write_gguf_from_hf(hf, path)
    tensors = []
    for i, (name, data, qtype) in enumerate(captured["tensors"]):
        stem = name.split(".")[-2]
        if data.ndim == 2 and stem in KQUANT_TYPES:
            qtype = "Q5_K" if name == "blk.1.ffn_down.weight" else KQUANT_TYPES[stem]
            data = tamed_blocks(qtype, data.shape[0], data.shape[1], seed=i)
        tensors.append((name, data, qtype))
    return gguf_files.write_tensors(path, tensors, arch=captured["arch"], metadata=captured["metadata"])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gguf_q")
    small = build_checkpoint(str(root / "llama"), "llama")  # hidden 64: the 32-blocks only
    hf = AutoModelForCausalLM.from_pretrained(small, dtype=torch.float32)
    qwen2 = AutoModelForCausalLM.from_pretrained(build_checkpoint(str(root / "qwen2"), "qwen2"),
                                                 dtype=torch.float32)  # q/k/v biases, no permutation
    wide = build_checkpoint(str(root / "wide"), "llama", hidden_size=256, intermediate_size=256, head_dim=64)
    hf_wide = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.float32)
    return {"q4_0": gguf_files.write_gguf_from_hf(hf, str(root / "q4_0.gguf"), qtype="Q4_0"),
            "q8_0": gguf_files.write_gguf_from_hf(hf, str(root / "q8_0.gguf"), qtype="Q8_0"),
            "q4_1": gguf_files.write_gguf_from_hf(hf, str(root / "q4_1.gguf"), qtype="Q4_1"),
            "qwen2_q8_0": gguf_files.write_gguf_from_hf(qwen2, str(root / "qwen2.gguf"), arch="qwen2",
                                                        qtype="Q8_0", name="tiny qwen2"),
            "kquant": write_kquant_file(hf_wide, str(root / "kquant.gguf")),
            "tokenizer:kquant": wide, "tokenizer:q4_0": small}  # the files carry no tokenizer


def _projections(model: Any) -> dict[str, Any]:
    return {n: m for n, m in model.named_modules() if n.rpartition(".")[2] in
            ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}


@pytest.mark.parametrize("which", ["q4_0", "q8_0", "q4_1", "qwen2_q8_0", "kquant"])
def test_kept_blocks_decode_to_the_dequantized_weights(files: dict[str, str], which: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pagedserve.model_executor.quantization.gguf_quant"):
        quant = load_model(files[which], torch.float32, "cpu", show_progress=False, quantization="gguf")
    plain = load_model(files[which], torch.float32, "cpu", show_progress=False)
    assert isinstance(quant.quant_config, GGUFConfig) and plain.quant_config is None
    ref = _projections(plain.model)
    kept = 0
    for name, layer in _projections(quant.model).items():
        method = layer.linear_method
        if which == "kquant" and name == "model.layers.1.mlp.down_proj":  # Q5_K: no kernel
            assert not isinstance(method, GGUFLinearMethod)
            assert torch.equal(layer.weight, ref[name].weight)
            continue
        assert isinstance(method, GGUFLinearMethod), name
        assert not hasattr(layer, "weight")
        w = torch.cat([dequantize_gguf(g) for g in method.weights], dim=0)
        assert torch.equal(w, ref[name].weight), name  # exact, Q/K rows in place
        if ref[name].bias is not None:
            assert torch.equal(layer.bias, ref[name].bias), name
        kept += 1
    assert kept == (7 if which == "kquant" else 8)
    qkv = _projections(quant.model)["model.layers.0.self_attn.qkv_proj"].linear_method
    if which == "kquant":  # [q | k] in Q4_K, [v] in Q6_K: two runs
        assert [(g.qtype, g.out_features) for g in qkv.weights] == [("Q4_K", 256 + 128), ("Q6_K", 128)]
        assert "Q5_K tensors" in caplog.text and "dequantized at load" in caplog.text
    else:
        assert len(qkv.weights) == 1 and qkv.weights[0].data.dtype == torch.uint8
    # embeddings and the LM head stay dequantized
    head: Any = quant.model.lm_head
    assert head.weight.dtype == torch.float32
    assert torch.equal(head.weight, cast(Any, plain.model.lm_head).weight)


def test_quantization_gguf_needs_a_gguf_file(tiny_checkpoints: Any) -> None:
    with pytest.raises(ValueError, match="no .gguf checkpoint"):
        load_model(tiny_checkpoints["llama"], torch.float32, "cpu", show_progress=False,
                   quantization="gguf")


def test_auto_keeps_quantized_over_budget(files: dict[str, str]) -> None:
    need = dequantized_bytes(files["q8_0"], torch.bfloat16)
    reader = gguf.GGUFReader(files["q8_0"])
    assert need == 2 * sum(int(t.n_elements) for t in reader.tensors)
    cpu = torch.device("cpu")
    assert auto_gguf_config(files["q8_0"], torch.bfloat16, cpu, budget_bytes=need) is None
    assert isinstance(auto_gguf_config(files["q8_0"], torch.bfloat16, cpu, budget_bytes=need - 1), GGUFConfig)
    assert auto_gguf_config(files["q8_0"], torch.bfloat16, cpu) is None  # off a GPU: dequantize


@pytest.mark.parametrize("which", ["q4_0", "kquant"])
def test_greedy_equals_the_dequantized_load(files: dict[str, str], which: str) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=10)
    kwargs: dict[str, Any] = dict(dtype="float32", max_model_len=128, kv_cache_memory_bytes=2 << 20,
                                  tokenizer=files[f"tokenizer:{which}"])
    prompts = ["the cat runs", "a dog"]
    want = [o.outputs[0].token_ids for o in LLM(model=files[which], **kwargs).generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in
           LLM(model=files[which], quantization="gguf", **kwargs).generate(prompts, params)]
    assert got == want


def test_tensor_parallel_matches_tp1(files: dict[str, str]) -> None:
    """Two ranks: q/k/v and gate/up rows, o/down whole blocks of each rank's K slice."""
    from pagedserve.model_executor.layers.context import ParallelGroup
    from tests.models.test_tensor_parallel import _steps, run_steps
    from tests.models.thread_comm import ThreadGroup

    file = files["q8_0"]
    one: Any = load_model(file, torch.float32, "cpu", show_progress=False).model  # dequantized, tp 1
    steps = _steps(one.spec.vocab_size)
    want = run_steps(one, steps)
    group = ThreadGroup(2)
    models = [load_model(file, torch.float32, "cpu", show_progress=False, quantization="gguf",
                         parallel=ParallelGroup(r, 2, group.comm(r))).model for r in range(2)]
    down = _projections(models[1])["model.layers.0.mlp.down_proj"]
    assert isinstance(down.linear_method, GGUFLinearMethod) and down.qweight.shape == (64, 64 // 32 * 34)
    per_rank = group.run(lambda rank: run_steps(models[rank], steps, 1))
    for got in per_rank:
        for g, w in zip(got, want, strict=True):
            for req in w:
                torch.testing.assert_close(g[req], w[req], atol=1e-4, rtol=1e-4)


def test_triton_kernels_in_the_model(files: dict[str, str]) -> None:
    """The quantized model on the Triton gguf_matmul (interpreted on CPU) gives the torch path's
    logits: decode steps take the fused GEMV (with the norm, and on gate_up the SiLU-and-mul,
    folded in; qkv mixes Q4_K and Q6_K and declines), prefill chunks the plain fused kernel."""
    pytest.importorskip("triton")
    import dataclasses

    from pagedserve.kernels.registry import TORCH_KERNELS
    from pagedserve.kernels.triton.gguf_matmul import FUSED_MAX_TOKENS, gguf_matmul
    from tests.models.test_tensor_parallel import _steps, run_steps

    file = files["kquant"]
    kernels = dataclasses.replace(TORCH_KERNELS, gguf_matmul=gguf_matmul, gguf_fused_max_tokens=FUSED_MAX_TOKENS)
    plain: Any = load_model(file, torch.float32, "cpu", show_progress=False, quantization="gguf").model
    fast = load_model(file, torch.float32, "cpu", show_progress=False, quantization="gguf",
                      kernels=kernels).model
    layer0 = _projections(fast)
    assert layer0["model.layers.0.mlp.gate_up_proj"].linear_method.fused_max_tokens(gated=True) == FUSED_MAX_TOKENS
    assert layer0["model.layers.0.self_attn.qkv_proj"].linear_method.fused_max_tokens(gated=False) == 0
    steps = _steps(plain.spec.vocab_size)[:3]  # prefills of 19-21 rows, one decode step of 3
    for g, w in zip(run_steps(fast, steps), run_steps(plain, steps), strict=True):
        for req in w:
            torch.testing.assert_close(g[req], w[req], atol=1e-4, rtol=1e-4)
