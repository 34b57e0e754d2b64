"""Kernel-test setup: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be in the environment before any @triton.jit decorator runs (that is when
Triton decides between compiling and interpreting), so it is set here, at conftest import, before
the test modules import pagedserve.kernels.triton.* (tests/conftest.py sets it too, and patches
the interpreter, for the model tests that run Triton kernels).
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
