"""Tune the fused MoE kernel's tiles for one MoE shape on this GPU and write the table that
kernels/triton/moe_config.py reads.

    python -m benchmarks.tune_moe [--experts 8 --hidden 4096 --inter 14336 --top-k 2]
        [--tokens 1 2 4 ...] [--out-dir pagedserve/kernels/triton/moe_configs] [--json RESULT.json]

For each token count T: random bf16 activations and weights (normal, never zeros), routing
drawn as top-k of random logits (what a random-weight router does), then a coordinate search:
the row block and gate-up tiles with the down tiles at the heuristic's, then the down tiles
with the best gate-up fixed. Each candidate is timed as the whole fused_moe call (sort, both
GEMMs, the slot sum) replayed from a CUDA graph, CUDA events, median of 20 after warm-up (the
table of 2026-12-01 was timed eagerly, launch gaps included); a candidate that does not
compile (shared memory) is skipped. The table ({T: config}) goes to
--out-dir/<moe_config.config_file_name(...)>; --json gets every timing, the heuristic's time and
the floor of each T: max(bytes of the experts hit / copy bandwidth, FLOPs / matrix rate).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import (
    environment,
    measure_copy_bandwidth,
    measure_matmul_rate,
    print_table,
    time_cuda_ms,
    write_json,
)
from pagedserve.kernels.triton.moe_config import (
    TUNED_DIR,
    GemmTiles,
    MoeConfig,
    config_file_name,
    heuristic_config,
    pow2_at_least_16,
)

# (block_n, block_k, num_warps, num_stages): narrow tiles for few rows per expert (weight
# bandwidth bound), wider ones that reuse a weight tile over many rows.
SMALL_TILES = [GemmTiles(32, 64, 4, 4), GemmTiles(32, 128, 4, 4), GemmTiles(32, 256, 4, 3),
               GemmTiles(64, 64, 4, 4), GemmTiles(64, 128, 4, 4), GemmTiles(64, 256, 4, 3),
               GemmTiles(128, 64, 4, 4), GemmTiles(128, 128, 4, 3)]  # fmt: skip
LARGE_TILES = [GemmTiles(64, 64, 4, 3), GemmTiles(64, 128, 4, 3), GemmTiles(128, 64, 4, 3),
               GemmTiles(128, 64, 8, 3), GemmTiles(128, 128, 8, 3), GemmTiles(256, 64, 8, 3),
               GemmTiles(64, 64, 4, 4), GemmTiles(128, 32, 4, 4)]  # fmt: skip


def fixed_config(h: int, inter: int) -> MoeConfig:
    """The one config the kernel used for every token count before this table (row block 16,
    64 x 64 tiles capped at the dims, 4 warps, Triton's default 3 stages): the baseline."""
    def tiles(n: int, k: int) -> GemmTiles:
        return GemmTiles(min(64, pow2_at_least_16(n)), min(64, pow2_at_least_16(k)), 4, 3)

    return MoeConfig(16, tiles(inter, h), tiles(h, inter))


def block_m_candidates(rows_per_expert: int) -> list[int]:
    if rows_per_expert <= 8:
        return [16]
    if rows_per_expert <= 32:
        return [16, 32]
    if rows_per_expert <= 128:
        return [16, 32, 64]
    return [32, 64, 128]


def make_weights(e: int, h: int, inter: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * inter, h, device="cuda", dtype=dtype, generator=g) * 0.02  # [E, 2I, H]
    w2 = torch.randn(e, h, inter, device="cuda", dtype=dtype, generator=g) * 0.02  # [E, H, I]
    return w13, w2


Case = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def make_case(t: int, e: int, k: int, weights: tuple[Tensor, Tensor], seed: int) -> Case:
    """(x [T, H], w13, w2, topk_weights [T, K], topk_ids [T, K]): routing = top-k of random logits."""
    w13, w2 = weights
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, w13.shape[2], device="cuda", dtype=w13.dtype, generator=g)
    logits = torch.randn(t, e, device="cuda", generator=g)
    topk_weights, ids = torch.softmax(logits, -1).topk(k, -1)
    return x, w13, w2, topk_weights, ids


def time_config(case: Case, config: MoeConfig) -> float | None:
    """Median ms of one fused_moe call replayed from a CUDA graph (as the engine's decode runs it:
    the expert sort's dozen small launches cost no host gaps), eager if capture fails."""
    from pagedserve.kernels.triton.fused_moe import fused_moe

    x, w13, w2, topk_weights, topk_ids = case

    def call() -> Tensor:
        return fused_moe(x, w13, w2, topk_weights, topk_ids, config)

    try:
        call()  # compile outside the capture
        torch.cuda.synchronize()
    except Exception as exc:  # out of shared memory, or a launch the device refuses
        print(f"  skip {config.to_json()}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        return None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        return time_cuda_ms(graph.replay, repeats=20, warmup=3)
    except Exception:
        return time_cuda_ms(call, repeats=20, warmup=3)


def tune_one(case: Case, t: int, e: int, k: int, h: int, inter: int) -> tuple[MoeConfig, float, list[dict]]:
    """Coordinate search: (block_m, gate_up) with the heuristic's down, and the heuristic and the old
    fixed config whole; then the down tiles with the best row block and gate-up fixed."""
    heuristic = heuristic_config(t, e, k, h, inter)
    trials: list[dict] = []
    best: tuple[float, MoeConfig] | None = None
    rows = max(1, t * k // e)
    for block_m in block_m_candidates(rows):
        tiles = SMALL_TILES if block_m == 16 else LARGE_TILES
        for up in tiles:
            cfg = MoeConfig(block_m, up, heuristic.down)
            ms = time_config(case, cfg)
            trials.append({"config": cfg.to_json(), "ms": ms})
            if ms is not None and (best is None or ms < best[0]):
                best = (ms, cfg)
    for baseline in (heuristic, fixed_config(h, inter)):  # never pick worse than these
        ms = time_config(case, baseline)
        trials.append({"config": baseline.to_json(), "ms": ms})
        if ms is not None and (best is None or ms < best[0]):
            best = (ms, baseline)
    assert best is not None, "no gate-up candidate compiled"
    block_m, up = best[1].block_m, best[1].gate_up
    for down in SMALL_TILES if block_m == 16 else LARGE_TILES:
        cfg = MoeConfig(block_m, up, down)
        ms = time_config(case, cfg)
        trials.append({"config": cfg.to_json(), "ms": ms})
        if ms is not None and ms < best[0]:
            best = (ms, cfg)
    return best[1], best[0], trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=14336)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--tokens", type=int, nargs="+",
                        default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--out-dir", default=str(TUNED_DIR))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    e, k, h, inter = args.experts, args.top_k, args.hidden, args.inter
    bandwidth = measure_copy_bandwidth()
    matmul_rate = measure_matmul_rate()
    expert_bytes = 3 * h * inter * torch.empty((), dtype=dtype).element_size()
    weights = make_weights(e, h, inter, dtype)
    name = config_file_name(e, h, inter, k, dtype, torch.cuda.get_device_name())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, Any] = {}
    rows_out: list[dict] = []

    def save(final: bool) -> None:
        write_json(args.json, {"environment": environment(), "bandwidth_bytes_per_s": bandwidth,
                               "matmul_flops_per_s": matmul_rate, "table_file": name, "complete": final,
                               "heuristic_over_tuned_geomean": _geomean_over_tuned(rows_out, "heuristic_ms"),
                               "fixed_over_tuned_geomean": _geomean_over_tuned(rows_out, "fixed_ms"),
                               "rows": rows_out, "args": vars(args)})  # fmt: skip

    for t in args.tokens:
        case = make_case(t, e, k, weights, seed=t)
        hit = int(case[4].unique().numel())
        floor_ms = 1e3 * max(hit * expert_bytes / bandwidth, 2 * 3 * t * k * h * inter / matmul_rate)
        heuristic_ms = time_config(case, heuristic_config(t, e, k, h, inter))
        fixed_ms = time_config(case, fixed_config(h, inter))
        config, ms, trials = tune_one(case, t, e, k, h, inter)
        table[str(t)] = config.to_json()
        (out / name).write_text(json.dumps(table, indent=1) + "\n")  # after each T: a cut run keeps its part
        rows_out.append({"tokens": t, "experts_hit": hit, "floor_ms": floor_ms,
                         "fixed_ms": fixed_ms, "heuristic_ms": heuristic_ms, "tuned_ms": ms,
                         "tuned_of_floor": floor_ms / ms, "block_m": config.block_m,
                         "gate_up": "{block_n}x{block_k} w{num_warps} s{num_stages}".format(**vars(config.gate_up)),
                         "down": "{block_n}x{block_k} w{num_warps} s{num_stages}".format(**vars(config.down)),
                         "trials": trials})  # fmt: skip
        print(f"T={t}: tuned {ms:.3f} ms, heuristic {heuristic_ms} ms, one fixed config {fixed_ms} ms, "
              f"floor {floor_ms:.3f} ms", flush=True)
        save(final=False)
        del case
    print_table(f"fused MoE tiles, E={e} H={h} I={inter} top-{k} {args.dtype} on {torch.cuda.get_device_name()}",
                [{c: r[c] for c in r if c != "trials"} for r in rows_out])  # fmt: skip
    print(f"wrote {out / name}")
    save(final=True)


def _geomean_over_tuned(rows: list[dict], key: str) -> float:
    ratios = [r[key] / r["tuned_ms"] for r in rows if r[key]]
    return math.exp(sum(map(math.log, ratios)) / max(1, len(ratios)))


if __name__ == "__main__":
    main()
