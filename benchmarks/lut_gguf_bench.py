"""SqueezeLLM and GGUF kernels at Llama-3-8B projection shapes against bf16 cuBLAS (GPU only).

    python -m benchmarks.lut_gguf_bench [--m 1 16 64 256] [--json OUT]

For each shape, format and token count: the kernel set's call (kernels/triton/lut_gemv.py
`lut_matmul`, kernels/triton/gguf_matmul.py `gguf_matmul`: the fused kernel up to 64 tokens,
dequantize + cuBLAS beyond) is first checked against its plain-torch twin, then timed as a CUDA
graph of CALLS back-to-back calls cycling over copies of the weight totalling >= RING_BYTES (so no
call finds its weight in L2), median of REPS replays, divided by CALLS. Columns: microseconds
per call, weight bytes, the bandwidth that implies, and the speed-up over bf16 F.linear.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import environment, print_table, time_cuda_ms, write_json
from pagedserve.kernels import reference_gguf, reference_lut
from pagedserve.kernels.reference_gguf import GGUF_BLOCKS, GGUFWeight

CALLS, REPS = 20, 15
RING_BYTES = 384 << 20
SHAPES = {"o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)


def _gguf_weight(qtype: str, n: int, k: int) -> GGUFWeight:
    """Valid random blocks: random bytes, then every float16 field set to a small scale."""
    _, block, size = GGUF_BLOCKS[qtype]
    raw = torch.randint(0, 256, (n * (k // block), size), dtype=torch.uint8, device="cuda")
    scale = torch.tensor([1e-3], dtype=torch.float16).view(torch.uint8).cuda()
    fields = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}[qtype]
    for at in fields:
        raw[:, at:at + 2] = scale
    if qtype == "Q6_K":
        raw[:, 192:208] &= 0x1F  # int8 scales in 0..31
    return GGUFWeight(raw.view(n, -1), qtype, k)


def _ring(make: Callable[[], Any], nbytes: int) -> list[Any]:
    return [make() for _ in range(max(1, math.ceil(RING_BYTES / nbytes)))]


def _graph_us(calls: list[Callable[[], Any]]) -> float:
    for fn in calls:  # compile and warm up outside the graph
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            calls[i % len(calls)]()
    return time_cuda_ms(graph.replay, REPS) * 1000 / CALLS


def _formats(n: int, k: int, x: torch.Tensor) -> dict[str, tuple[list[Any], Callable[[Any], Any],
                                                                  Callable[[Any], Any], int]]:
    """name -> (ring of weights, kernel call, twin call, weight bytes)."""
    from pagedserve.kernels.triton.gguf_matmul import gguf_matmul
    from pagedserve.kernels.triton.lut_gemv import lut_matmul

    def make_lut() -> tuple[torch.Tensor, torch.Tensor]:  # every int32 is 8 valid indices
        words = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
        return words, torch.randn(n, 16, device="cuda").half() * 0.02

    out: dict[str, tuple[list[Any], Callable[[Any], Any], Callable[[Any], Any], int]] = {
        "bf16": (_ring(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2),
                 lambda w: F.linear(x, w), lambda w: F.linear(x, w), n * k * 2),
        "squeezellm": (_ring(make_lut, n * k // 2), lambda w: lut_matmul(x, *w),
                       lambda w: reference_lut.lut_matmul(x, *w), n * k // 2 + n * 32),
    }
    for qtype in GGUF_BLOCKS:
        nbytes = reference_gguf.row_bytes(qtype, k) * n
        out[f"gguf {qtype}"] = (_ring(functools.partial(_gguf_weight, qtype, n, k), nbytes),
                                lambda w: gguf_matmul(x, w), lambda w: reference_gguf.gguf_matmul(x, w),
                                nbytes)
    return out


def bench(ms: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for shape, (n, k) in SHAPES.items():
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 0.1
            base_us = None
            for name, (ring, fast, twin, nbytes) in _formats(n, k, x).items():
                want, got = twin(ring[0]).float(), fast(ring[0]).float()
                err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
                us = _graph_us([functools.partial(fast, w) for w in ring])
                base_us = us if name == "bf16" else base_us
                rows.append({"shape": shape, "N x K": f"{n} x {k}", "M": m, "format": name,
                             "us": us, "weight MB": nbytes / 1e6, "GB/s": nbytes / us / 1e3,
                             "x bf16": (base_us or us) / us, "rel err": err})
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("lut_gguf_bench needs a CUDA GPU")
    rows = bench(args.m)
    print_table("SqueezeLLM / GGUF kernels vs bf16 F.linear (us per call, L2-cold)", rows)
    write_json(args.json, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
