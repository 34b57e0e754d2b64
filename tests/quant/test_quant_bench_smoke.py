"""benchmarks/quant_gpu.py --tiny on the CPU (the script the H200 runs), and the packer's device
path it uses: a quick check that the whole pipeline runs and its accounting is right."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pagedserve.testing.checkpoints import build_checkpoint
from pagedserve.testing.quant_pack import quantize_checkpoint
from pagedserve.testing.quant_pack.gptq import gptq_config, gptq_quantizer


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's scratch folder, holding the tiny Llama it would build (hidden 128)."""
    folder = tmp_path_factory.mktemp("scratch")
    build_checkpoint(str(folder / "tiny-llama"), "llama", dtype="bfloat16", hidden_size=128, intermediate_size=256)
    return folder


def test_packer_device_path_writes_the_same_checkpoint(tmp_path: Path, scratch: Path) -> None:
    src = scratch / "tiny-llama"
    quantizer, config = gptq_quantizer(4, 128), gptq_config(4, 128)
    deq = quantize_checkpoint(src, tmp_path / "a", quantizer, config)
    assert quantize_checkpoint(src, tmp_path / "b", quantizer, config, device="cpu", keep_dequantized=False) == {}
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert sorted(a) == sorted(b) and len(deq) == 2 * 7
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].equal(b[name]), name


def test_quant_bench_tiny_runs_end_to_end(tmp_path: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    from benchmarks import quant_gpu
    from pagedserve.builtin_model import smollm2_gguf

    out = tmp_path / "quant.json"
    argv = ["quant_gpu", "--tiny", "--device", "cpu", "--formats", "gptq4", "--scratch", str(scratch),
            "--json", str(out), "--real-layers", "1", "--real-tokens", "48"]
    real = smollm2_gguf() is not None
    argv += ["--parts", "8b,real", "--real-formats", "bf16,awq4"] if real else ["--parts", "8b"]
    monkeypatch.setattr(sys, "argv", argv)
    quant_gpu.main()
    result = json.loads(out.read_text())
    speed = {r["format"]: r for r in result["speed"]}
    assert sorted(speed) == ["gptq4"]
    for r in speed.values():
        for key in ("b1_tok_s", "b16_tok_s", "b64_tok_s", "mix_out_tok_s", "b1_floor_tok_s"):
            assert r[key] > 0, (r["format"], key)
    # the tiny Llama's 2 layers: 7 projections of 128 x 128 (q, o), 64 x 128 (k, v), 256 x 128 x 3
    elements = 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128)
    # 4 bits per weight, plus a bf16 scale and zero per 128 inputs and output column
    assert speed["gptq4"]["memory_bytes"]["linear"] == elements // 2 + 2 * 2 * elements // 128
    mem = speed["gptq4"]["memory_bytes"]
    assert mem["read_per_token"] == mem["linear"] + mem["lm_head"] + mem["other"]  # untied: no embedding
    assert Path(out).with_suffix(".png").exists() or not _has_matplotlib()
    assert sorted(p.name for p in scratch.iterdir()) == (["smollm2-f32"] if real else []) + ["tiny-llama"]
    # (the packed checkpoints are gone)
    if real:
        ppl = {r["format"]: r for r in result["perplexity"]}
        assert sorted(ppl) == ["awq4", "bf16"] and ppl["bf16"]["vs_bf16"] == 1.0
        assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in ppl.values())
        assert ppl["awq4"]["linear_mb"] < ppl["bf16"]["linear_mb"] / 3


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
