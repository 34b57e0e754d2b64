"""Loader: checkpoint discovery, dtype resolution, sharded streaming, and its error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve.model_executor.loader import (
    load_model,
    resolve_dtype,
    resolve_model_dir,
    safetensors_files,
)
from pagedserve.testing.checkpoints import build_checkpoint


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_same_weights(tiny_checkpoints: Any,
                                               tiny_checkpoint_sharded: str) -> None:
    files = safetensors_files(tiny_checkpoint_sharded)
    assert len(files) > 1 and (Path(tiny_checkpoint_sharded) / "model.safetensors.index.json").is_file()
    sharded = load_model(tiny_checkpoint_sharded, torch.float32, "cpu", show_progress=False)
    single = load_model(tiny_checkpoints["llama"], torch.float32, "cpu", show_progress=False)
    assert sharded.dtype == torch.float32 and sharded.model_dir == tiny_checkpoint_sharded
    a, b = dict(sharded.model.named_parameters()), dict(single.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:  # same seed -> same weights, however they were split across files
        assert torch.equal(a[name], b[name]), name


def test_bf16_checkpoint_auto_dtype_and_cast(tmp_path: Path) -> None:
    path = build_checkpoint(str(tmp_path / "bf16"), "qwen3", dtype="bfloat16")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    assert resolve_dtype("auto", cfg, device="cpu") == torch.bfloat16
    loaded = load_model(path, torch.bfloat16, "cpu", show_progress=False)
    params = list(loaded.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    model: Any = loaded.model
    rope = model.model.layers[0].self_attn.rotary_emb.cos_sin_cache
    assert rope.dtype == torch.float32  # the rotary cache stays float32
    raw = load_file(str(Path(path) / "model.safetensors"))
    assert torch.equal(model.model.norm.weight, raw["model.norm.weight"])
    up = model.model.layers[1].mlp.gate_up_proj.weight
    assert torch.equal(up[128:], raw["model.layers.1.mlp.up_proj.weight"])
    as_fp32: Any = load_model(path, torch.float32, "cpu", show_progress=False).model  # upcast
    assert torch.equal(as_fp32.model.norm.weight, raw["model.norm.weight"].float())


@pytest.mark.parametrize("name,expected", [
    ("float32", torch.float32), ("float", torch.float32), ("half", torch.float16),
    ("float16", torch.float16), ("bfloat16", torch.bfloat16), ("BFloat16", torch.bfloat16),
    (torch.float16, torch.float16),
])
def test_resolve_dtype_explicit(name: Any, expected: torch.dtype) -> None:
    assert resolve_dtype(name, SimpleNamespace(dtype=torch.float32)) == expected


def test_resolve_dtype_auto() -> None:
    fp32 = SimpleNamespace(dtype=torch.float32)
    assert resolve_dtype("auto", fp32, device="cpu") == torch.float32
    assert resolve_dtype("auto", fp32, device="cuda") in (torch.bfloat16, torch.float16)
    assert resolve_dtype("auto", SimpleNamespace(torch_dtype="bfloat16"), device="cuda") == torch.bfloat16
    assert resolve_dtype("auto", SimpleNamespace(dtype="float16"), device="cpu") == torch.float16
    assert resolve_dtype("auto", SimpleNamespace(), device="cpu") == torch.float32


@pytest.mark.parametrize("bad", ["int8", "fp8", "", torch.int8])
def test_resolve_dtype_rejects_unknown(bad: Any) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype(bad, SimpleNamespace())


def test_unknown_architecture(tiny_checkpoints: Any, tmp_path: Path) -> None:
    path = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*supported.*LlamaForCausalLM"):
        load_model(str(path), torch.float32, "cpu", show_progress=False)


def test_missing_files(tiny_checkpoints: Any, tiny_checkpoint_sharded: str, tmp_path: Path) -> None:
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(Path(tiny_checkpoints["llama"]) / "config.json", no_weights)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(str(no_weights), torch.float32, "cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path), torch.float32, "cpu")
    sharded = _copy(tiny_checkpoint_sharded, tmp_path / "sharded")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="missing.*model-00002"):
        load_model(str(sharded), torch.float32, "cpu")


def test_missing_weight_is_named(tiny_checkpoints: Any, tmp_path: Path) -> None:
    path = _copy(tiny_checkpoints["qwen2"], tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights for: model.layers.1.self_attn.qkv_proj.bias, "
                                         "model.norm.weight"):
        load_model(str(path), torch.float32, "cpu", show_progress=False)


def test_resolve_model_dir_local_and_offline_cache(tiny_checkpoints: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    local = tiny_checkpoints["llama"]
    assert resolve_model_dir(local) == str(Path(local).resolve())
    # A hub cache as huggingface_hub lays it out: models--org--name/{refs/main, snapshots/<sha>}
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(local, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = resolve_model_dir("acme/tiny-llama", download_dir=str(tmp_path / "hub"))
    assert Path(got) == repo / "snapshots" / sha
    with pytest.raises(ValueError, match="'acme/absent'.*HF_HUB_OFFLINE"):
        resolve_model_dir("acme/absent", download_dir=str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_dir(str(Path(local) / "config.json"))
