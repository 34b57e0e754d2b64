"""--load-format: PyTorch .bin checkpoints ("pt", and "auto" when there are no safetensors) load
the same weights as the safetensors checkpoint; "dummy" needs no weights at all; formats the
loader lacks fail clearly."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pagedserve.config import EngineArgs
from pagedserve.model_executor.loader import iterate_weights, load_model, pt_files


def _as_bin(src: str, dst: Path) -> Path:
    """The same checkpoint with its weights in pytorch_model.bin instead of safetensors."""
    shutil.copytree(src, dst)
    tensors: dict[str, torch.Tensor] = {}
    for f in dst.glob("*.safetensors"):
        tensors.update(load_file(f))
        f.unlink()
    torch.save(tensors, dst / "pytorch_model.bin")
    torch.save({"lr": 1.0}, dst / "training_args.bin")  # trainer state is not weights
    return dst


def test_pt_weights_match_safetensors(tiny_checkpoints: Any, tmp_path: Path) -> None:
    src = tiny_checkpoints["llama"]
    binary = _as_bin(src, tmp_path / "bin")
    assert [Path(f).name for f in pt_files(str(binary))] == ["pytorch_model.bin"]
    reference = dict(load_model(src, torch.float32, "cpu", show_progress=False).model.state_dict())
    for fmt in ("pt", "auto"):
        loaded = load_model(str(binary), torch.float32, "cpu", show_progress=False, load_format=fmt).model
        state = loaded.state_dict()
        assert state.keys() == reference.keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, reference[name]), name
    with pytest.raises(FileNotFoundError, match="--load-format pt or auto reads them"):
        load_model(str(binary), torch.float32, "cpu", show_progress=False, load_format="safetensors")
    with pytest.raises(FileNotFoundError, match="no PyTorch"):
        iterate_weights(src, "pt")


def test_offline_llm_with_pt_weights(tiny_checkpoints: Any, tmp_path: Path) -> None:
    from pagedserve import LLM, SamplingParams

    binary = _as_bin(tiny_checkpoints["llama"], tmp_path / "bin")
    params = SamplingParams(temperature=0.0, max_tokens=8)
    kwargs: dict[str, Any] = dict(dtype="float32", max_model_len=128, kv_cache_memory_bytes=2 << 20)
    want = LLM(model=tiny_checkpoints["llama"], **kwargs).generate(["the cat runs"], params)[0].outputs[0].token_ids
    got = LLM(model=str(binary), load_format="pt", **kwargs).generate(["the cat runs"], params)[0].outputs[0].token_ids
    assert list(got) == list(want)


@pytest.mark.parametrize("fmt", ["gguf", "bitsandbytes", "tensorizer"])
def test_unsupported_formats(fmt: str) -> None:
    with pytest.raises(ValueError, match=f"load_format '{fmt}' is not supported yet"):
        EngineArgs(model="m", load_format=fmt).create_engine_config()


def _config_only(src: str, dst: Path) -> Path:
    """The checkpoint without its weight files: what load_format="dummy" needs."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return dst


def test_dummy_weights_need_no_files_and_are_seeded(tiny_checkpoints: Any, tmp_path: Path) -> None:
    bare = _config_only(tiny_checkpoints["qwen3"], tmp_path / "bare")
    with pytest.raises(FileNotFoundError):
        load_model(str(bare), torch.float32, "cpu", show_progress=False)
    first = load_model(str(bare), torch.float32, "cpu", show_progress=False, load_format="dummy").model
    second = load_model(str(bare), torch.float32, "cpu", show_progress=False, load_format="dummy").model
    reference = load_model(tiny_checkpoints["qwen3"], torch.float32, "cpu", show_progress=False).model
    assert first.state_dict().keys() == reference.state_dict().keys()
    for name, param in first.named_parameters():
        assert torch.equal(param, dict(second.named_parameters())[name]), name
        if param.dim() == 1 and "norm" in name:  # q_norm / k_norm / layer norms
            assert torch.all(param == 1), name
        else:
            assert param.std() > 0.01 and param.abs().max() < 0.2, name


def test_dummy_llm_generates(tiny_checkpoints: Any, tmp_path: Path) -> None:
    from pagedserve import LLM, SamplingParams

    bare = _config_only(tiny_checkpoints["llama"], tmp_path / "bare")
    llm = LLM(model=str(bare), load_format="dummy", dtype="float32", max_model_len=128,
              kv_cache_memory_bytes=2 << 20)
    out = llm.generate(["the cat runs"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6
