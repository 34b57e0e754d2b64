"""The kernel sequence of a model step, as the layers issue it, and the host time of a step: to
check on CPU that a model-side refactor keeps the GPU path's kernels and adds no Python work.
Run it against two trees and diff the traces:

    PYTHONPATH=OLD_TREE python -m benchmarks.kernel_trace --out old.txt
    PYTHONPATH=NEW_TREE python -m benchmarks.kernel_trace --out new.txt && diff old.txt new.txt

The model is the tiny Llama test checkpoint built with the torch kernel set shaped like the
Triton one: the GEMV slot filled by its twin (limits 4 / 4 / 1 tokens, as on the H200) and an
attention backend with the fused rotary + KV write. Every kernel-set entry point called is one
trace line (its own aten ops are not traced); every aten op outside them (F.linear, embedding,
views) is one line too. Steps: a prefill of 40 tokens over 2 requests, then decode steps of 8,
3 and 1 rows (the unfused, norm-fused and fully fused paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pagedserve.kernels import reference as ref
from pagedserve.kernels.registry import TORCH_KERNELS, GemvLimits

TRACE: list[str] = []
_DEPTH = [0]


class _AtenTrace(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if _DEPTH[0] == 0:
            TRACE.append(f"aten {func}")
        return func(*args, **(kwargs or {}))


def _traced(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        flags = ",".join(k for k, v in kwargs.items() if v is not None and v is not False)
        TRACE.append(f"kernel {name}({flags})")
        _DEPTH[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _DEPTH[0] -= 1
    return call


def traced_kernels() -> Any:
    ks = TORCH_KERNELS
    attention = dataclasses.replace(
        ks.attention, name="torch-fused-rotary", write_kv=_traced("write_kv", ks.attention.write_kv),
        attend=_traced("attend", ks.attention.attend),
        rotary_write_kv=_traced("rotary_write_kv", ref.rotary_write_kv_cache))
    return dataclasses.replace(
        ks, name="traced", rms_norm=_traced("rms_norm", ks.rms_norm),
        fused_add_rms_norm=_traced("fused_add_rms_norm", ks.fused_add_rms_norm),
        rotary_embedding=_traced("rotary_embedding", ks.rotary_embedding),
        silu_and_mul=_traced("silu_and_mul", ks.silu_and_mul), attention=attention,
        fused_gemv=_traced("fused_gemv", ref.fused_gemv_reference), gemv_limits=GemvLimits(4, 4, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="write the trace here (default: stdout)")
    parser.add_argument("--repeat", type=int, default=200, help="timed repetitions per step")
    args = parser.parse_args()

    import pagedserve.model_executor.loader as loader
    from pagedserve.testing.checkpoints import build_checkpoint
    from tests.models.test_model_parity import PagedHarness

    torch.set_num_threads(1)
    kernels = traced_kernels()
    loader.get_kernel_set = lambda name: kernels  # type: ignore[assignment]  (both trees call it)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(f"{tmp}/llama", "llama", num_hidden_layers=2)
        model = loader.load_model(path, torch.float32, "cpu", show_progress=False).model
    g = torch.Generator().manual_seed(0)
    prompts = {f"r{i}": torch.randint(5, 400, (60,), generator=g).tolist() for i in range(8)}
    steps = [[("r0", prompts["r0"], 0, 19), ("r1", prompts["r1"], 0, 21)],
             [(r, t, 0, 7) for r, t in list(prompts.items())[2:]]]
    decode = {rows: [(r, t, 21 + i, 22 + i) for i, (r, t) in enumerate(list(prompts.items())[:rows])]
              for rows in (8, 3, 1)}
    h = PagedHarness(model, seed=1)
    lines: list[str] = []
    for name, chunk in [("prefill", steps[0]), ("prefill", steps[1])] + [
            (f"decode x{rows}", c) for rows, c in decode.items()]:
        TRACE.clear()
        with _AtenTrace():
            h.step(chunk)
        lines.append(f"== {name}: {len(TRACE)} calls")
        lines.extend(TRACE)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    # host time per decode step (tiny model: Python work dominates), tracing off
    for rows, chunk in decode.items():
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(args.repeat):
                h.step(chunk)  # the same positions again: same slots, same work
            best = min(best, (time.perf_counter() - started) / args.repeat)
        print(f"decode step, {rows} rows: {best * 1e6:.1f} us (best of 5 x {args.repeat})")


if __name__ == "__main__":
    main()
