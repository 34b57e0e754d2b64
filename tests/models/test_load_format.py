"""--load-format: PyTorch .bin checkpoints ("pt", and "auto" when there are no safetensors) load
the same weights as the safetensors checkpoint; formats the loader lacks fail clearly."""

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


@pytest.mark.parametrize("fmt", ["gguf", "bitsandbytes", "dummy"])
def test_unsupported_formats(fmt: str) -> None:
    with pytest.raises(ValueError, match=f"load_format '{fmt}' is not supported yet"):
        EngineArgs(model="m", load_format=fmt).create_engine_config()
