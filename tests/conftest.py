"""Shared fixtures: tiny Hugging Face checkpoints built once per test session.

    tiny_checkpoints["llama"]      -> path of a checkpoint directory (built on first access)
    hf_reference("qwen2")          -> (transformers model in float32 eval mode, tokenizer)

Architectures: pagedserve.testing.checkpoints.ARCHS = llama, llama3, mistral, qwen2, qwen3.
Checkpoints are built lazily, so a test that needs only "llama" pays only for "llama".
"""

from __future__ import annotations

import os

# Without a GPU, Triton kernels run in the interpreter; set before anything imports triton.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pagedserve.testing.checkpoints import ARCHS, build_checkpoint


class TinyCheckpoints(Mapping[str, str]):
    """arch -> checkpoint dir, each built on first access into one session tmp dir."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._built: dict[str, str] = {}

    def __getitem__(self, arch: str) -> str:
        if arch not in ARCHS:
            raise KeyError(f"unknown tiny arch {arch!r}; known: {list(ARCHS)}")
        if arch not in self._built:
            self._built[arch] = build_checkpoint(str(self._root / arch), arch)
        return self._built[arch]

    def __iter__(self) -> Iterator[str]:
        return iter(ARCHS)

    def __len__(self) -> int:
        return len(ARCHS)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    return TinyCheckpoints(tmp_path_factory.mktemp("tiny_checkpoints"))


@pytest.fixture(scope="session")
def tiny_checkpoint_sharded(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A llama checkpoint saved as several safetensors shards + index."""
    return build_checkpoint(str(tmp_path_factory.mktemp("tiny_sharded") / "llama"), "llama",
                            num_shards=3)


@pytest.fixture(scope="session")
def hf_reference(tiny_checkpoints: TinyCheckpoints) -> Callable[[str], tuple[Any, Any]]:
    """Returns get(arch) -> (HF model, HF tokenizer), loaded once per arch (float32, eager)."""
    cache: dict[str, tuple[Any, Any]] = {}

    def get(arch: str) -> tuple[Any, Any]:
        if arch not in cache:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = tiny_checkpoints[arch]
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         attn_implementation="eager")
            cache[arch] = (model.eval(), AutoTokenizer.from_pretrained(path))
        return cache[arch]

    return get
