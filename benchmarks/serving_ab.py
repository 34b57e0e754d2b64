"""Two source trees' OpenAI servers side by side on one GPU, under the same Poisson loads, in
alternating order: the before / after comparison of a change to the serving path.

    python -m benchmarks.serving_ab --model DIR --old-tree DIR [--new-tree .] [--rates 16 32]
        [--num-requests 300] [--repeats 2] [--gpu-memory-utilization 0.44] [--new-server-args "..."] [--json OUT]

Both servers run at once, each started (one after the other: each sizes its KV cache alone) with
--gpu-memory-utilization of the GPU, its own share, so both fit and a comparison needs no restart
between runs; each gets a warm-up burst (JIT, allocator, graph warm-up) that is not reported. Then for every rate, `--repeats` rounds, each round running the
same seeded workload (benchmarks/serving.measure_rate: the ShareGPT-like mix, streamed, ignore_eos)
against both servers one after the other, the order flipping every round (old new, new old, ...),
so drift in the machine falls on both alike. Only one server is loaded at a time. The table
gives each tree's median over its rounds; the JSON every run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from typing import Any

from benchmarks.common import environment, print_table, write_json
from benchmarks.serving import default_client_procs, measure_rate, running_server
from benchmarks.workload import sharegpt_like

KEYS = ("achieved_rps", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
        "itl_p50_ms", "itl_p99_ms", "failed")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--old-tree", required=True, help="source tree of the before (holds pagedserve/)")
    parser.add_argument("--new-tree", default=".")
    parser.add_argument("--rates", type=float, nargs="+", default=[16, 32])
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup-requests", type=int, default=48)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.44)
    parser.add_argument("--server-args", default="--max-model-len 4096 --log-level WARNING")
    parser.add_argument("--new-server-args", default="",
                        help="flags for the new tree's server only (the same tree twice with a flag on: --old-tree . "
                             "--new-server-args --async-scheduling)")
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--client-procs", type=int, default=default_client_procs(),
                        help="client processes sending the requests (default: one per 4 cores, at most 8)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    flags = [*args.server_args.split(), "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    work = sharegpt_like(args.vocab_size, args.num_requests)
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        # one after the other: running_server returns once /health answers, so each profiles its
        # memory alone (the old tree counts the first server's memory as its own: start it first)
        bases: dict[str, str] = {}
        ready: dict[str, float] = {}
        for tag, tree in (("old", args.old_tree), ("new", args.new_tree)):
            own = [*flags, *args.new_server_args.split()] if tag == "new" else flags
            base, seconds = stack.enter_context(
                running_server(args.model, own, f"{args.log_dir}/server-ab-{tag}.log", tree=tree))
            bases[tag], ready[tag] = base, seconds
            n = args.warmup_requests
            measure_rate(base, "bench", work.prompts[:n], work.output_lens[:n], 32.0, seed=1000,
                         client_procs=args.client_procs)
        print(f"servers ready: old {ready['old']:.1f} s, new {ready['new']:.1f} s", flush=True)
        for rate in args.rates:
            for round_index in range(args.repeats):
                order = ("old", "new") if round_index % 2 == 0 else ("new", "old")
                for tag in order:
                    row = measure_rate(bases[tag], "bench", work.prompts, work.output_lens, rate,
                                       seed=int(rate) * 10 + round_index, client_procs=args.client_procs)
                    runs.append({"tree": tag, "round": round_index, **row})
                    print(f"rate {rate:g} round {round_index} {tag}: TTFT P50 {row['ttft_p50_ms']:.1f} ms, "
                          f"TPOT P50 {row['tpot_p50_ms']:.2f} ms, {row['output_tokens_per_s']:.0f} tok/s", flush=True)
                    write_json(args.json, {"runs": runs, "ready_s": ready, "args": vars(args)})
    summary = []
    for rate in args.rates:
        for tag in ("old", "new"):
            mine = [r for r in runs if r["tree"] == tag and r["rate_rps"] == rate]
            summary.append({"rate": rate, "tree": tag, "rounds": len(mine),
                            **{k: statistics.median(r[k] for r in mine) for k in KEYS}})  # fmt: skip
    print_table("old vs new server, medians over rounds (ms)", summary)
    write_json(args.json, {"environment": environment(), "summary": summary, "runs": runs, "ready_s": ready,
                           "args": vars(args)})  # fmt: skip


if __name__ == "__main__":
    main()
