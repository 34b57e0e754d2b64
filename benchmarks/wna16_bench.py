"""Weight-only int4 (or int8) matmul at Llama-3-8B decode shapes: kernels/triton/wna16.py vs bf16.

    python -m benchmarks.wna16_bench [--t 1 2 4 8 16 64 256] [--bits 4] [--group 128]
                                     [--act-order] [--json OUT]                  # GPU only
    python -m benchmarks.wna16_bench --sweep [--budget-s 300]    # time candidate launch configs

Shapes (the lm_head stays bf16 in a quantized model and is not timed here):
    qkv      6144 x 4096   rms_norm(x + residual) prologue
    o        4096 x 4096
    gate_up  2 x 14336 x 4096   norm prologue + SiLU-and-mul epilogue
    down     4096 x 14336

Per (shape, T), each op is what a decoder layer runs for it:
    bf16        Triton add+norm, F.linear (cuBLAS), Triton SiLU-and-mul (the unfused path)
    bf16_gemv   gemv.fused_gemv with the norm / SiLU folded in (T <= 8 only)
    tinygemmN   torch._weight_int4pack_mm (int4_tinygemm.py, inner_k_tiles N) between the same
                Triton norm and SiLU-and-mul as bf16 (int4 weights of a bf16 model)
    int         wna16_matmul with the same norm / gating, default dispatch (timed twice: the
                spread between the two runs is the noise); int_gemv / int_gemm force either
                kernel (T <= 16) so the crossover GEMV_DISPATCH_M can be read off the table
Each beside its floor: max(bytes / copy bandwidth, flops / bf16 matmul rate), both measured in
this run (a 2 GiB device copy, counting read + write; an 8192^3 bf16 cuBLAS matmul). Bytes =
weights (+ scales + zeros) + activations in and out.

Timing as benchmarks/gemv_bench.py: a CUDA graph of CALLS calls cycling over weight copies that
total >= RING_BYTES (no call finds its weight in L2), warm-up replays, median of REPS replays by
CUDA events, divided by CALLS. Data are random and non-zero: random int32 words (every bit pattern
is a valid packed word), scales, zero points and activations. Every shape is first checked against
the twin (reference_quant.wna16_matmul, float32 math) with the output poisoned beforehand; a
relative error above 2e-2 prints FAIL and the run goes on.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import environment, measure_copy_bandwidth, print_table, write_json
from benchmarks.gemv_bench import RING_BYTES, time_per_call
from benchmarks.int4_tinygemm import TinygemmInt4, supports, tinygemm_matmul, tinygemm_prepare
from pagedserve.kernels import reference_quant as rq
from pagedserve.kernels.triton.activation import silu_and_mul
from pagedserve.kernels.triton.gemv import MAX_M, fused_gemv
from pagedserve.kernels.triton.norm import fused_add_rms_norm
from pagedserve.kernels.triton.wna16 import (
    GEMV_MAX_M,
    PreparedWNA16,
    WNA16GemmConfig,
    WNA16GemvConfig,
    pick_gemm_config,
    pick_gemv_config,
    wna16_matmul,
    wna16_prepare,
)
from pagedserve.kernels.triton.wna16_mma import MmaConfig, mma_block_k, wna16_mma_matmul, wna16_mma_pack


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    n: int  # result columns (I for gated)
    k: int
    kind: str  # "plain" | "norm" | "gated" (norm prologue + SiLU-and-mul)

    @property
    def rows(self) -> int:
        return 2 * self.n if self.kind == "gated" else self.n


SHAPES = (
    Shape("qkv", 6144, 4096, "norm"),
    Shape("o", 4096, 4096, "plain"),
    Shape("gate_up", 14336, 4096, "gated"),
    Shape("down", 4096, 14336, "plain"),
)


TINYGEMM_INNER_K_TILES = (8,)  # tinygemm layouts timed beside our kernels (2 and 4 were no faster: h200-2026-12-03-wna16-mma)


def _clone(w: PreparedWNA16) -> PreparedWNA16:
    return w._replace(qweight=w.qweight.clone(), scales=w.scales.clone(), zeros=w.zeros.clone())


class Case:
    """One (shape, T): a ring of quantized weights, a ring of their bf16 dequantized twins, inputs."""

    def __init__(self, shape: Shape, t: int, bits: int, group: int, act_order: bool) -> None:
        g = torch.Generator(device="cuda").manual_seed(0)
        self.shape, self.t = shape, t
        k, nr, pf = shape.k, shape.rows, 32 // bits
        groups = k // group
        qweight = torch.randint(-(1 << 31), 1 << 31, (k // pf, nr), generator=g, device="cuda", dtype=torch.int32)
        scales = ((torch.rand(groups, nr, generator=g, device="cuda") + 0.5) * (4 / ((1 << bits) * math.sqrt(k))))
        zeros = torch.randint(0, 1 << bits, (groups, nr), generator=g, device="cuda").float()
        perm = torch.randperm(k, generator=g, device="cuda") if act_order else None
        self.canonical = rq.WNA16Weight(qweight, scales.bfloat16(), zeros.bfloat16(), perm, bits, group)
        first = wna16_prepare(self.canonical)
        self.int_bytes = sum(t.numel() * t.element_size() for t in (first.qweight, first.scales, first.zeros))
        self.ring = [first] + [_clone(first) for _ in range(max(1, math.ceil(RING_BYTES / self.int_bytes)) - 1)]
        dense = rq.dequantize_wna16(self.canonical)  # [K, N] bf16, rows in the stored order
        if perm is not None:  # y = x[:, perm] @ W  ==  x @ W' with W'[perm] = W
            dense = torch.empty_like(dense).index_copy_(0, perm, dense)
        w_bf16 = dense.t().contiguous()  # [NR, K], nn.Linear layout
        self.bf16_bytes = w_bf16.numel() * 2
        self.dense = [w_bf16] + [w_bf16.clone() for _ in range(max(1, math.ceil(RING_BYTES / self.bf16_bytes)) - 1)]
        self.tiny: dict[int, list[TinygemmInt4]] = {}
        if supports(self.canonical) and t <= 64:  # tinygemm per inner_k_tiles layout (its time grows with T)
            for ikt in TINYGEMM_INNER_K_TILES:
                one = tinygemm_prepare(self.canonical, ikt)
                size = one.packed.numel() * one.packed.element_size()
                self.tiny[ikt] = [one] + [one._replace(packed=one.packed.clone())
                                          for _ in range(max(1, math.ceil(RING_BYTES / size)) - 1)]
        self.mma: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.mma_block_k = mma_block_k(k, group)
        if bits == 4 and self.mma_block_k and not act_order:  # the tensor-core kernel's own packing
            words = wna16_mma_pack(rq.unpack_along_rows(qweight, 4), self.mma_block_k)
            s_t = self.canonical.scales.t().contiguous()
            z128 = (self.canonical.zeros.float() + 128).bfloat16().t().contiguous()
            self.mma = [(words, s_t, z128)] + [(words.clone(), s_t.clone(), z128.clone())
                                               for _ in range(max(1, math.ceil(RING_BYTES / self.int_bytes)) - 1)]
        self.x = torch.randn(t, k, generator=g, device="cuda").bfloat16()
        self.residual = torch.randn(t, k, generator=g, device="cuda").bfloat16()
        self.norm_weight = (torch.randn(k, generator=g, device="cuda") * 0.1 + 1).bfloat16()
        self.act_bytes = 2 * t * k * (3 if shape.kind != "plain" else 1) + 2 * t * shape.n
        self.flops = 2 * t * nr * k

    def kwargs(self) -> dict[str, Any]:
        if self.shape.kind == "plain":
            return {}
        return {"norm_weight": self.norm_weight, "residual": self.residual, "gated": self.shape.kind == "gated"}

    def quantized(self, w: PreparedWNA16, gemv: WNA16GemvConfig | None = None,
                  gemm: WNA16GemmConfig | None = None) -> Any:
        return wna16_matmul(self.x, w, gemv_config=gemv, gemm_config=gemm, **self.kwargs())

    def unfused_bf16(self, w: torch.Tensor) -> Any:
        h = self.x
        if self.shape.kind != "plain":
            h, _ = fused_add_rms_norm(self.x, self.residual, self.norm_weight, 1e-6)
        y = F.linear(h, w)
        return silu_and_mul(y) if self.shape.kind == "gated" else y

    def tinygemm(self, w: TinygemmInt4) -> Any:
        """The layer's op through tinygemm: norm (Triton), tinygemm, SiLU-and-mul (Triton)."""
        h = self.x
        if self.shape.kind != "plain":
            h, _ = fused_add_rms_norm(self.x, self.residual, self.norm_weight, 1e-6)
        y = tinygemm_matmul(h, w)
        return silu_and_mul(y) if self.shape.kind == "gated" else y

    def mma_op(self, w: tuple[torch.Tensor, torch.Tensor, torch.Tensor], config: MmaConfig | None = None) -> Any:
        """The layer's op through the tensor-core kernel: norm (Triton) then wna16_mma (gating fused)."""
        h = self.x
        if self.shape.kind != "plain":
            h, _ = fused_add_rms_norm(self.x, self.residual, self.norm_weight, 1e-6)
        words, s_t, z128 = w
        return wna16_mma_matmul(h, words, s_t, z128, None, group_size=self.canonical.group_size,
                                block_k=self.mma_block_k, gated=self.shape.kind == "gated", config=config)

    def check_mma(self, config: MmaConfig | None = None) -> float:
        """max |mma - twin| / max |twin| (poisoned output, twice: the split-K counters reset); FAIL above 2e-2."""
        want = rq.wna16_matmul(self.x, self.canonical, **self.kwargs())
        want = want[0] if isinstance(want, tuple) else want
        err = 0.0
        for _ in range(2):
            got = self.mma_op(self.mma[0], config)
            err = max(err, ((got.float() - want.float()).abs().max() / want.float().abs().max()).item())
        if not err < 2e-2 or got.isnan().any():
            print(f"FAIL mma {config} {self.shape.name} T={self.t}: relative error {err}", flush=True)
        return err

    def check_tinygemm(self) -> float:
        """max |tinygemm - twin| / max |twin|; prints FAIL above 2e-2."""
        worst = 0.0
        want = rq.wna16_matmul(self.x, self.canonical, **self.kwargs())
        want = want[0] if isinstance(want, tuple) else want
        for ikt, ring in self.tiny.items():
            got = self.tinygemm(ring[0])
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            if not err < 2e-2 or got.isnan().any():
                print(f"FAIL tinygemm ikt {ikt} {self.shape.name} T={self.t}: relative error {err}", flush=True)
            worst = max(worst, err)
        return worst

    def gemv_bf16(self, w: torch.Tensor) -> Any:
        return fused_gemv(self.x, w, **self.kwargs())

    def check(self) -> float:
        """max |int - twin| / max |twin| (output poisoned first); prints FAIL above 2e-2."""
        w = self.ring[0]
        torch.cuda.synchronize()
        got = self.quantized(w)
        want = rq.wna16_matmul(self.x, self.canonical, **self.kwargs())
        ok = True
        if isinstance(want, tuple):
            ok = torch.equal(got[1], want[1])
            got, want = got[0], want[0]
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        if not err < 2e-2 or not ok or got.isnan().any():
            print(f"FAIL {self.shape.name} T={self.t}: relative error {err}, residual exact {ok}", flush=True)
        return err


def measure_matmul_rate(n: int = 8192) -> float:
    """bf16 cuBLAS FLOP/s on an n^3 product (graphs of 5 products, median of 9 replays)."""
    a = torch.randn(n, n, device="cuda").bfloat16()
    b = torch.randn(n, n, device="cuda").bfloat16()
    t = time_per_call([partial(torch.mm, a, b)], calls=5, reps=9)
    return 2 * n**3 / t


def _calls(fn: Callable[[Any], Any], ring: list[Any]) -> list[Callable[[], Any]]:
    return [partial(fn, w) for w in ring]


def bench(ts: list[int], bits: int, group: int, act_order: bool, copy_bw: float, rate: float) -> list[dict[str, Any]]:
    rows = []
    for shape in SHAPES:
        for t in ts:
            case = Case(shape, t, bits, group, act_order)
            err = case.check()
            floor_int = max((case.int_bytes + case.act_bytes) / copy_bw, case.flops / rate)
            floor_bf16 = max((case.bf16_bytes + case.act_bytes) / copy_bw, case.flops / rate)
            t_bf16 = time_per_call(_calls(case.unfused_bf16, case.dense))
            t_bf16_gemv = time_per_call(_calls(case.gemv_bf16, case.dense)) if t <= MAX_M else math.nan
            t_int = time_per_call(_calls(case.quantized, case.ring))
            t_int2 = time_per_call(_calls(case.quantized, case.ring))
            t_gemv = t_gemm = math.nan
            if t <= GEMV_MAX_M:
                cfg = pick_gemv_config(t, shape.n, shape.k, gated=shape.kind == "gated")
                t_gemv = time_per_call(_calls(partial(case.quantized, gemv=cfg), case.ring))
                gcfg = pick_gemm_config(t, shape.n, shape.k)
                t_gemm = time_per_call(_calls(partial(case.quantized, gemm=gcfg), case.ring))
            best_bf16 = min(t_bf16, t_bf16_gemv) if t <= MAX_M else t_bf16
            tiny = {f"tinygemm{ikt}_us": time_per_call(_calls(case.tinygemm, ring)) * 1e6
                    for ikt, ring in case.tiny.items()}
            tiny_err = case.check_tinygemm() if case.tiny else math.nan
            mma_err = t_mma = math.nan
            try:
                if case.mma:
                    mma_err = case.check_mma()
                    t_mma = time_per_call(_calls(case.mma_op, case.mma))
            except Exception as exc:  # a failing kernel leaves its row's other columns measured
                print(f"FAIL mma {shape.name} T={t}: {type(exc).__name__}: {exc}"[:2000], flush=True)
            rows.append({
                "shape": shape.name, "T": t, "int_MB": case.int_bytes / 1e6,
                "bf16_us": t_bf16 * 1e6, "bf16_gemv_us": t_bf16_gemv * 1e6, "bf16_floor_us": floor_bf16 * 1e6,
                "int_us": t_int * 1e6, "int_us_rep": t_int2 * 1e6, "int_gemv_us": t_gemv * 1e6,
                "int_gemm_us": t_gemm * 1e6, "int_floor_us": floor_int * 1e6,
                "%floor": 100 * floor_int / t_int, "speedup": best_bf16 / t_int, "rel_err": err,
                **tiny, "tinygemm_err": tiny_err, "mma_us": t_mma * 1e6, "mma_err": mma_err,
                "mma_%floor": 100 * floor_int / t_mma, "mma_speedup": best_bf16 / t_mma,
            })
            print(f"{shape.name} T={t}: bf16 {best_bf16 * 1e6:.1f} us, int {t_int * 1e6:.1f} us "
                  f"(floor {floor_int * 1e6:.1f}), x{best_bf16 / t_int:.2f}; mma {t_mma * 1e6:.1f} "
                  f"x{best_bf16 / t_mma:.2f}; "
                  + ", ".join(f"{key} {us:.1f}" for key, us in tiny.items()), flush=True)
            del case
            torch.cuda.empty_cache()
    return rows


def gemv_candidates(t: int, gated: bool) -> list[WNA16GemvConfig]:
    m_pad = 1 << (t - 1).bit_length()
    return [WNA16GemvConfig(bn, warps, split) for bn in (1, 2, 4, 8, 16) for warps in (2, 4, 8)
            for split in (1, 2, 4) if (2 if gated else 1) * m_pad * bn <= 64]


def gemm_candidates(t: int) -> list[WNA16GemmConfig]:
    out = []
    for bm in (16, 32, 64, 128):
        if bm > max(16, 2 * t):
            continue
        for bn in (32, 64, 128):
            for bk in (64, 128):
                for warps in (4, 8):
                    out.append(WNA16GemmConfig(bm, bn, bk, num_warps=warps, num_stages=3))
    return out


def sweep(ts: list[int], bits: int, group: int, copy_bw: float, budget_s: float) -> list[dict[str, Any]]:
    """Time launch candidates per (shape, T); keep the best 4 and the table's choice."""
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for t in ts:
        for shape in SHAPES:
            case = Case(shape, t, bits, group, act_order=False)
            gated = shape.kind == "gated"
            chosen: Any = pick_gemv_config(t, shape.n, shape.k, gated=gated) if t <= GEMV_MAX_M else None
            cands: list[tuple[str, Any]] = [("gemv", c) for c in gemv_candidates(t, gated)] if t <= GEMV_MAX_M else []
            cands += [("gemm", c) for c in gemm_candidates(t)] if t >= 8 else []
            results = []
            for kind, cfg in cands:
                if time.time() - t0 > budget_s:
                    print("sweep: time budget spent", flush=True)
                    return rows
                fn = partial(case.quantized, gemv=cfg) if kind == "gemv" else partial(case.quantized, gemm=cfg)
                results.append((time_per_call(_calls(fn, case.ring), reps=7), kind, cfg))
            results.sort(key=lambda r: r[0])
            for i, (sec, kind, cfg) in enumerate(results):
                if i < 4 or cfg == chosen:
                    rows.append({"shape": shape.name, "T": t, "kernel": kind, "config": str(cfg), "us": sec * 1e6,
                                 "%copy": 100 * case.int_bytes / sec / copy_bw, "chosen": cfg == chosen})
            print(f"{shape.name} T={t}: " + ", ".join(f"{k} {c} {s * 1e6:.1f}" for s, k, c in results[:4]), flush=True)
            del case
            torch.cuda.empty_cache()
    return rows


def mma_sweep(ts: list[int], bits: int, group: int, copy_bw: float, budget_s: float) -> list[dict[str, Any]]:
    """Time the tensor-core kernel's launch candidates (BLOCK_M, splits, stages) per (shape, T)."""
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for t in ts:
        for shape in SHAPES:
            case = Case(shape, t, bits, group, act_order=False)
            block_ms = [bm for bm in (16, 32, 64, 128) if bm >= min(t, 16) and bm <= max(16, 2 * t)]
            results = []
            for bm in block_ms:
                for splits in (1, 2, 4, 8):
                    for stages in (3, 4):
                        for block_n, warps in ((64, 4), (128, 8)):
                            for scaled in (True, False):
                                if time.time() - t0 > budget_s:
                                    print("mma sweep: time budget spent", flush=True)
                                    return rows
                                cfg = MmaConfig(bm, splits, stages, warps, block_n, scaled)
                                if case.check_mma(cfg) >= 2e-2:
                                    continue
                                fn = partial(case.mma_op, config=cfg)
                                results.append((time_per_call(_calls(fn, case.mma), reps=7), cfg))
            results.sort(key=lambda r: r[0])
            default = time_per_call(_calls(case.mma_op, case.mma), reps=7)
            rows.append({"shape": shape.name, "T": t, "config": "default", "us": default * 1e6,
                         "%copy": 100 * case.int_bytes / default / copy_bw})
            for sec, cfg in results[:4]:
                rows.append({"shape": shape.name, "T": t, "config": str(tuple(cfg)), "us": sec * 1e6,
                             "%copy": 100 * case.int_bytes / sec / copy_bw})
            print(f"mma {shape.name} T={t}: default {default * 1e6:.1f}; "
                  + ", ".join(f"{tuple(c)} {s_ * 1e6:.1f}" for s_, c in results[:4]), flush=True)
            del case
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256])
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--mma-sweep", action="store_true", help="sweep the tensor-core kernel's launch configs")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    env = environment()
    copy_bw = measure_copy_bandwidth()
    rate = measure_matmul_rate()
    print(f"{env['device']}: copy {copy_bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    if args.mma_sweep:
        rows = mma_sweep(args.t, args.bits, args.group, copy_bw, args.budget_s)
        print_table(f"wna16_mma launch sweep, int{args.bits} g{args.group} ({env['device']})", rows)
    elif args.sweep:
        rows = sweep(args.t, args.bits, args.group, copy_bw, args.budget_s)
        print_table(f"WNA16 launch sweep, int{args.bits} g{args.group} ({env['device']})", rows)
    else:
        rows = bench(args.t, args.bits, args.group, args.act_order, copy_bw, rate)
        print_table(f"int{args.bits} g{args.group}{' act-order' if args.act_order else ''} vs bf16, graphs of "
                    f"calls ({env['device']}, copy {copy_bw / 1e12:.2f} TB/s, {rate / 1e12:.0f} TFLOP/s)", rows)
    write_json(args.json, {"copy_bandwidth": copy_bw, "bf16_matmul_flops": rate, "bits": args.bits,
                           "group": args.group, "act_order": args.act_order, "rows": rows})


if __name__ == "__main__":
    main()
