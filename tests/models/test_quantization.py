"""The quantization seam end to end, with the TEST-ONLY method of tests/models/int4_method.py:
chosen per layer by prefix (merged layers through packed_modules_mapping), its packed
parameters sliced by the loader (also per tensor-parallel rank), its post-load hook run, the
decode fusion declined for its layers (kept for the others), and greedy generation equal to the
unquantized model holding the same (dequantized) weights. Plus detection and agreement rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve import EngineArgs
from pagedserve.model_executor.layers.context import ParallelGroup
from pagedserve.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from pagedserve.model_executor.loader import load_model
from pagedserve.model_executor.quantization import base
from pagedserve.model_executor.quantization.base import resolve_quant_config
from tests.engine.engine_helpers import greedy, make_engine, make_prompts, run_staggered
from tests.models.int4_method import NAME, Int4Config, Int4Method, quantize
from tests.models.test_model_parity import PagedHarness
from tests.models.test_tensor_parallel import TWIN_KERNELS, _run_tp, _steps, run_steps
from tests.models.thread_comm import ThreadGroup

# checkpoint module names: layer 0's o_proj; layer 1's q/k/v (-> qkv_proj) and gate/up (-> gate_up_proj)
MODULES = ["model.layers.0.self_attn.o_proj", *(f"model.layers.1.self_attn.{p}_proj" for p in "qkv"),
           "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
QUANTIZED = sorted(["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.qkv_proj",
                    "model.layers.1.mlp.gate_up_proj"])


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # the test method alone (the published formats, gptq / awq / fp8 ..., register on import)
    monkeypatch.setattr(base, "_REGISTRY", {NAME: Int4Config})


def _quantized_pair(src: str, root: Path) -> tuple[str, str]:
    """(quantized checkpoint, unquantized checkpoint with the dequantized weights) from `src`."""
    quant, plain = root / "int4", root / "dequant"
    for d in (quant, plain):
        shutil.copytree(src, d)
    tensors = load_file(str(Path(src) / "model.safetensors"))
    q_tensors, d_tensors = dict(tensors), dict(tensors)
    for module in MODULES:
        weight = q_tensors.pop(f"{module}.weight")
        packed, scales, dequant = quantize(weight)
        q_tensors[f"{module}.qweight"], q_tensors[f"{module}.scales"] = packed, scales
        d_tensors[f"{module}.weight"] = dequant
    save_file(q_tensors, str(quant / "model.safetensors"), metadata={"format": "pt"})
    save_file(d_tensors, str(plain / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": NAME, "modules": MODULES}
    (quant / "config.json").write_text(json.dumps(cfg))
    return str(quant), str(plain)


@pytest.fixture(scope="module")
def int4_pairs(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    return {arch: _quantized_pair(tiny_checkpoints[arch], tmp_path_factory.mktemp(f"int4_{arch}"))
            for arch in ("llama", "llama3")}


def _linears(model: Any) -> dict[str, LinearBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}


def test_method_by_prefix_hook_and_declined_fusion(int4_pairs: Any) -> None:
    quant_dir, plain_dir = int4_pairs["llama"]
    loaded = load_model(quant_dir, torch.float32, "cpu", show_progress=False, kernels=TWIN_KERNELS)
    cfg = loaded.quant_config
    assert isinstance(cfg, Int4Config)
    linears = _linears(loaded.model)
    assert sorted(n for n, m in linears.items() if isinstance(m.linear_method, Int4Method)) == QUANTIZED
    assert all(isinstance(m.linear_method, UnquantizedLinearMethod)
               for n, m in linears.items() if n not in QUANTIZED)
    assert sorted(cfg.processed) == QUANTIZED  # the post-load hook ran once per quantized layer
    assert not any(hasattr(linears[n], "qweight") for n in QUANTIZED)  # repacked into `q`
    # fusion: declined by the int4 layers, kept by the unquantized ones (the twin GEMV's limits)
    assert [linears[n].linear_method.fused_max_tokens(gated=False) for n in QUANTIZED] == [0, 0, 0]
    layer0 = loaded.model.model.layers[0]
    assert layer0.self_attn.qkv_proj._norm_max_tokens == 4 and layer0.mlp._gated_max_tokens == 1
    layer1 = loaded.model.model.layers[1]
    assert layer1.self_attn.qkv_proj._norm_max_tokens == 0 and layer1.mlp._gated_max_tokens == 0

    plain = load_model(plain_dir, torch.float32, "cpu", show_progress=False, kernels=TWIN_KERNELS).model
    steps = _steps(loaded.model_spec.vocab_size)  # prefill, then 3-row and 1-row decode steps
    got_h, want_h = PagedHarness(loaded.model, seed=1), PagedHarness(plain, seed=1)
    for chunk in steps:
        got, want = got_h.step(chunk), want_h.step(chunk)
        for req in want:
            torch.testing.assert_close(got[req], want[req], atol=1e-4, rtol=1e-4)
    assert cfg.applied == set(QUANTIZED)


def test_greedy_generation_equals_unquantized(int4_pairs: Any) -> None:
    quant_dir, plain_dir = int4_pairs["llama"]
    prompts = make_prompts(500, seed=3, lengths=(1, 7, 17, 33, 100))
    runs = []
    for path, quantization in ((quant_dir, NAME), (plain_dir, None)):
        engine = make_engine(path, quantization=quantization)
        finished = run_staggered(engine, prompts, greedy())
        runs.append([list(finished[str(i)].outputs[0].token_ids) for i in range(len(prompts))])
    assert runs[0] == runs[1]
    assert all(len(tokens) == 10 for tokens in runs[0])


@pytest.mark.parametrize("arch", ["llama", "llama3"])  # llama3: 1 KV head, replicated (packed k/v)
def test_quantized_tensor_parallel_matches_tp1(arch: str, int4_pairs: Any) -> None:
    quant_dir, _ = int4_pairs[arch]
    one = load_model(quant_dir, torch.float32, "cpu", show_progress=False).model
    steps = _steps(one.spec.vocab_size)
    want = run_steps(one, steps)
    per_rank, _ = _run_tp(quant_dir, 2, steps)
    for got in per_rank:
        for g, w in zip(got, want, strict=True):
            for req in w:
                torch.testing.assert_close(g[req], w[req], atol=1e-4, rtol=1e-4)
    shard = load_model(quant_dir, torch.float32, "cpu", show_progress=False,
                       parallel=ParallelGroup(1, 2, ThreadGroup(2).comm(1))).model
    qkv = _linears(shard)["model.layers.1.self_attn.qkv_proj"]
    assert qkv.q.shape == ((4 // 2 + 2 * qkv.num_kv_heads) * 32, 64)  # this rank's heads, unpacked


def test_checkpoint_and_request_must_agree(int4_pairs: Any, tiny_checkpoints: Any, tmp_path: Path) -> None:
    quant_dir, plain_dir = int4_pairs["llama"]
    with pytest.raises(ValueError, match=r"quantization='gptq' was requested.*quantized with 'test_int4'"):
        load_model(quant_dir, torch.float32, "cpu", show_progress=False, quantization="gptq")
    with pytest.raises(ValueError, match=r"quantization='gptq' was requested.*'test_int4'"):
        EngineArgs(model=quant_dir, quantization="gptq").create_engine_config()  # at start-up
    with pytest.raises(ValueError, match=r"quantization='test_int4' was requested.* is not quantized"):
        load_model(plain_dir, torch.float32, "cpu", show_progress=False, quantization=NAME)
    assert resolve_quant_config(plain_dir, None, None) is None
    # a method nobody registered, named by a quant_config.json beside config.json
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_checkpoints["llama"], unknown)
    (unknown / "quant_config.json").write_text(json.dumps({"quant_method": "nope"}))
    with pytest.raises(ValueError, match=r"unknown quantization method 'nope'; known methods: .*'test_int4'"):
        load_model(str(unknown), torch.float32, "cpu", show_progress=False)
    # quantize_config.json without a quant_method (AutoGPTQ style): the user's name decides
    (unknown / "quant_config.json").unlink()
    (unknown / "quantize_config.json").write_text(json.dumps({"modules": MODULES}))
    with pytest.raises(ValueError, match="names no quant_method; pass quantization="):
        resolve_quant_config(str(unknown), None, None)
    found = resolve_quant_config(str(unknown), None, NAME)
    assert isinstance(found, Int4Config) and found.modules == MODULES


def test_cli_flag_names_known_methods(capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedserve.entrypoints.openai.cli_args import engine_args_from, parse_args

    # only the test method is known here (built-in methods would otherwise join the list)
    monkeypatch.setattr(base, "_REGISTRY", {NAME: Int4Config})
    monkeypatch.setattr(base, "_BUILTIN_MODULES", {})

    assert engine_args_from(parse_args(["--model", "m", "--quantization", NAME])).quantization == NAME
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--quantization", "nope"])
    assert "--quantization 'nope' is not a known method; known: ['test_int4']" in capsys.readouterr().err
