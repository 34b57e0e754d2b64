"""Kernel-test setup: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be in the environment before any @triton.jit decorator runs (that is when
Triton decides between compiling and interpreting), so it is set here, at conftest import, before
the test modules import pagedserve.kernels.triton.*.
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Without triton the Triton kernel tests are not collected at all (the module would also skip
# itself through pytest.importorskip when run directly).
collect_ignore_glob: list[str] = []
if importlib.util.find_spec("triton") is None:
    collect_ignore_glob.append("test_triton_*.py")


def _patch_interpreter() -> None:
    """Work around two Triton 3.6 interpreter bugs (test-only; compiled GPU kernels unaffected):

    * a scalar tensor becomes a Python int (`range(lo, hi)` with run-time bounds) through
      int(ndarray of shape [1]), which NumPy >= 2.4 rejects: take element 0 instead;
    * tl.dot multiplies bfloat16 operands as their raw uint16 bit patterns (the interpreter stores
      bf16 as uint16): widen them to float32 first, which is exact.
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or collect_ignore_glob:
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
