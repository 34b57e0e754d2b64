"""Shared fixtures: tiny Hugging Face checkpoints built once per test session.

    tiny_checkpoints["llama"]      -> path of a checkpoint directory (built on first access)
    hf_reference("qwen2")          -> (transformers model in float32 eval mode, tokenizer)

Architectures: pagedserve.testing.checkpoints.ARCHS = llama, llama3, mistral, qwen2, qwen3.
Checkpoints are built lazily, so a test that needs only "llama" pays only for "llama".
"""

from __future__ import annotations

import importlib.util
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


def _patch_interpreter() -> None:
    """Work around two Triton interpreter bugs (test-only; compiled GPU kernels unaffected):

    * a scalar tensor becomes a Python int (`range(lo, hi)` with run-time bounds) through
      int(ndarray of shape [1]), which NumPy >= 2.4 rejects: take element 0 instead;
    * tl.dot multiplies bfloat16 operands as their raw uint16 bit patterns (the interpreter stores
      bf16 as uint16): widen them to float32 first, which is exact.
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    import triton.language as tl
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_pagedserve_patched", False):
        return

    def patched(tensor: object, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore[attr-defined]

    patched._pagedserve_patched = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = patched

    builder_cls = interp.InterpreterBuilder
    original_dot = builder_cls.create_dot

    def create_dot(self: object, a: object, b: object, *rest: object) -> object:
        widen = self.cast_impl  # type: ignore[attr-defined]
        if a.dtype.scalar == tl.bfloat16:  # type: ignore[attr-defined]
            a = widen(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:  # type: ignore[attr-defined]
            b = widen(b, tl.float32)
        return original_dot(self, a, b, *rest)

    builder_cls.create_dot = create_dot


_patch_interpreter()



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
