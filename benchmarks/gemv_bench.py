"""Decode GEMV at Llama-3-8B shapes: cuBLAS (+ the separate norm / SiLU kernels) vs fused_gemv.

    python -m benchmarks.gemv_bench [--m 1 4 8] [--json OUT]     # GPU only
    python -m benchmarks.gemv_bench --sweep [--budget-s 200]     # time candidate launch configs
                                                                 # (compiled first by 15 processes)

Every timing is a CUDA graph of CALLS back-to-back calls (so launch gaps do not count), replayed
after warm-up, median of REPS replays by CUDA events, divided by CALLS. The calls cycle over copies
of the weight totalling >= RING_BYTES so that no call finds its weight in L2 (as in a model, where
each layer has its own). Bytes moved = weight + activations in + out; compared with the
device-to-device copy bandwidth measured in the same run. Each shape is first checked against
the twin (reference.fused_gemv_reference) with random inputs.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import environment, measure_copy_bandwidth, print_table, write_json
from pagedserve.kernels import reference as ref
from pagedserve.kernels.triton.activation import silu_and_mul
from pagedserve.kernels.triton.gemv import GemvConfig, fused_gemv, pick_config
from pagedserve.kernels.triton.norm import fused_add_rms_norm

CALLS, REPS = 20, 15
RING_BYTES = 384 << 20  # > 6x the 50-60 MB L2 of H100/H200


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    n: int  # result columns (I for gated)
    k: int
    kind: str  # "plain" | "norm" (add + rms_norm prologue) | "gated" (norm prologue + SiLU epilogue)

    @property
    def rows(self) -> int:
        return 2 * self.n if self.kind == "gated" else self.n


SHAPES = (
    Shape("qkv", 6144, 4096, "norm"),
    Shape("o", 4096, 4096, "plain"),
    Shape("gate_up", 14336, 4096, "gated"),
    Shape("down", 4096, 14336, "plain"),
    Shape("lm_head", 128256, 4096, "plain"),
)


class Case:
    """Inputs of one (shape, M): a ring of weight copies and the activations."""

    def __init__(self, shape: Shape, m: int, dtype: torch.dtype = torch.bfloat16,
                 ring_bytes: int = RING_BYTES) -> None:
        g = torch.Generator(device="cuda").manual_seed(0)
        self.shape, self.m = shape, m
        w_bytes = shape.rows * shape.k * 2
        copies = max(1 if ring_bytes == 0 else 2, math.ceil(ring_bytes / w_bytes))
        self.weights = [
            (torch.randn(shape.rows, shape.k, device="cuda", generator=g) / math.sqrt(shape.k)).to(dtype)
            for _ in range(copies)
        ]
        self.x = torch.randn(m, shape.k, device="cuda", generator=g).to(dtype)
        self.residual = torch.randn(m, shape.k, device="cuda", generator=g).to(dtype)
        self.norm_weight = (torch.randn(shape.k, device="cuda", generator=g) * 0.1 + 1).to(dtype)
        self.bytes = w_bytes + 2 * m * shape.k * (3 if shape.kind != "plain" else 1) + 2 * m * shape.n

    def fused(self, w: torch.Tensor | None, config: GemvConfig | None = None) -> Any:
        w = self.weights[0] if w is None else w
        if self.shape.kind == "plain":
            return fused_gemv(self.x, w, config=config)
        return fused_gemv(self.x, w, norm_weight=self.norm_weight, residual=self.residual,
                          gated=self.shape.kind == "gated", config=config)

    def unfused(self, w: torch.Tensor) -> Any:
        """What the model runs without fused_gemv: Triton add+norm, cuBLAS, Triton SiLU-and-mul."""
        h = self.x
        if self.shape.kind != "plain":
            h, _ = fused_add_rms_norm(self.x, self.residual, self.norm_weight, 1e-6)
        y = F.linear(h, w)
        return silu_and_mul(y) if self.shape.kind == "gated" else y

    def calls(self, fn: Callable[[torch.Tensor], Any]) -> list[Callable[[], Any]]:
        return [partial(fn, w) for w in self.weights]


def time_per_call(fns: list[Callable[[], Any]], calls: int = CALLS, reps: int = REPS) -> float:
    """Seconds per call: median over replays of a graph of `calls` calls cycling over fns."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:  # compile / cuBLAS heuristics outside the capture
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    times.sort()
    return times[len(times) // 2]


def check(case: Case) -> float:
    """Max |fused - twin| / max |twin| at this shape; prints FAIL (and keeps going, so one run
    still measures everything) above 1e-2 or when the residual sum is not bit-exact."""
    w = case.weights[0]
    got = case.fused(w)
    exact = True
    if case.shape.kind == "plain":
        want = ref.fused_gemv_reference(case.x, w)
    else:
        want = ref.fused_gemv_reference(case.x, w, norm_weight=case.norm_weight, residual=case.residual,
                                        gated=case.shape.kind == "gated")
        assert isinstance(want, tuple)
        exact = torch.equal(got[1], want[1])
        got, want = got[0], want[0]
    assert isinstance(want, torch.Tensor)
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    if not err < 1e-2 or not exact:
        print(f"FAIL {case.shape.name} M={case.m}: relative error {err}, residual exact {exact}", flush=True)
    return err


def bench(ms: list[int], copy_bw: float) -> list[dict[str, Any]]:
    rows = []
    for shape in SHAPES:
        for m in ms:
            case = Case(shape, m)
            err = check(case)
            t_cublas = time_per_call(case.calls(partial(F.linear, case.x)))
            t_unfused = t_cublas if shape.kind == "plain" else time_per_call(case.calls(case.unfused))
            t_plain = time_per_call(case.calls(partial(fused_gemv, case.x)))
            t_fused = time_per_call(case.calls(case.fused))
            cfg = pick_config(shape.n, shape.k, m, norm=shape.kind != "plain", gated=shape.kind == "gated")
            rows.append({
                "shape": shape.name, "N": shape.rows, "K": shape.k, "M": m,
                "MB": case.bytes / 1e6,
                "cublas_us": t_cublas * 1e6, "unfused_us": t_unfused * 1e6,
                "gemv_plain_us": t_plain * 1e6, "fused_us": t_fused * 1e6,
                "fused_TB/s": case.bytes / t_fused / 1e12,
                "%copy": 100 * case.bytes / t_fused / copy_bw,
                "speedup": t_unfused / t_fused,
                "rel_err": err,
                "config": _cfg_name(cfg),
            })
            del case
            torch.cuda.empty_cache()
    return rows


def candidates(m: int, gated: bool) -> list[GemvConfig]:
    """Launch configs worth timing (bf16): all warps along K, 2..16 weight vectors of 16 bytes per
    thread and step, accumulator + weight registers within ~96 (prefetch: ~128) per thread."""
    m_pad, g = 1 << (m - 1).bit_length(), 2 if gated else 1
    out = []
    for prefetch in (False, True):
        for warps in (2, 4, 8):
            for bk in (256 * warps, 512 * warps):
                for bn in (1, 2, 4, 8, 16):
                    vectors = g * bn * bk // (256 * warps)
                    regs = vectors * (8 + m_pad) if prefetch else vectors * (4 + m_pad)
                    if bk <= 2048 and 2 <= vectors <= 16 and regs <= (128 if prefetch else 96):
                        out.append(GemvConfig(bn, bk, warps, prefetch=prefetch))
    return out


def _cfg_name(cfg: GemvConfig) -> str:
    return f"{cfg.block_n}x{cfg.block_k} w{cfg.num_warps}{' pf' if cfg.prefetch else ''}"


def _compile(jobs: list[tuple[int, str, GemvConfig]]) -> int:
    """Compile (into Triton's on-disk cache) the kernels the sweep will time; runs in a worker.
    Small N, same K divisibility and M as the real shapes: the same specialisations."""
    for m, kind, cfg in jobs:
        Case(Shape("warm", 256, 4096, kind), m, ring_bytes=0).fused(None, cfg)
    torch.cuda.synchronize()
    return len(jobs)


def precompile(ms: list[int], workers: int = 15) -> None:
    jobs = [(m, kind, cfg) for m in ms for kind in ("plain", "norm", "gated")
            for cfg in candidates(m, kind == "gated")]
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        done = sum(pool.map(_compile, [jobs[i::workers] for i in range(workers)]))
    print(f"precompiled {done} kernels in {time.time() - t0:.0f} s", flush=True)


def sweep(ms: list[int], copy_bw: float, budget_s: float) -> list[dict[str, Any]]:
    """Time every candidate per (shape, M); keep the best 4 and the table's choice."""
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for m in ms:
        for shape in SHAPES:
            case = Case(shape, m)
            check(case)
            t_unfused = time_per_call(case.calls(case.unfused))
            chosen = pick_config(shape.n, shape.k, m, norm=shape.kind != "plain", gated=shape.kind == "gated")
            results = []
            for cfg in candidates(m, shape.kind == "gated"):
                if time.time() - t0 > budget_s:
                    print("sweep: time budget spent", flush=True)
                    return rows
                if math.ceil(shape.n / cfg.block_n) < 132:
                    continue
                t = time_per_call(case.calls(partial(case.fused, config=cfg)), reps=7)
                results.append((t, cfg))
            results.sort(key=lambda r: r[0])
            keep = [r for i, r in enumerate(results) if i < 5 or r[1] == chosen]
            for t, cfg in keep:
                rows.append({"shape": shape.name, "M": m, "cfg": _cfg_name(cfg), "us": t * 1e6,
                             "%copy": 100 * case.bytes / t / copy_bw, "unfused_us": t_unfused * 1e6,
                             "chosen": cfg == chosen})
            print(f"{shape.name} M={m} unfused {t_unfused * 1e6:.1f} us | "
                  + ", ".join(f"{_cfg_name(c)}{'*' if c == chosen else ''} {t * 1e6:.1f}"
                              f" ({100 * case.bytes / t / copy_bw:.0f}%)" for t, c in keep), flush=True)
            del case
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the twin's float32 matmul must be exact fp32
    env = environment()
    copy_bw = measure_copy_bandwidth()
    print(f"{env['device']}: copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)
    if args.sweep:
        precompile(args.m)
        rows = sweep(args.m, copy_bw, args.budget_s)
    else:
        rows = bench(args.m, copy_bw)
        print_table(f"GEMV, bf16, graphs of {CALLS} calls ({env['device']}, copy {copy_bw / 1e12:.2f} TB/s)",
                    rows)
    write_json(args.json, {"copy_bandwidth": copy_bw, "rows": rows})


if __name__ == "__main__":
    main()
