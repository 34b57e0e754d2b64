"""What a step with prefill costs beside running decodes: engine step wall time for N decoding
requests alone (the CUDA graph) and with one new prompt of P tokens prefilled in the same step
(a mixed-step CUDA graph up to --mixed-graph-max-tokens, eager past it), for several N and P,
medians of repeated steps.

    python -m benchmarks.mixed_step [--model DIR] [--decodes 32 128 256] [--prefill 16 128 512 2048]
                                    [--repeats 7] [--enforce-eager] [--mixed-graph-max-tokens N]
                                    [--profile] [--json OUT]

Why: the SLO controller's /metrics trace on the H200 (benchmarks/results/h200-2026-12-02-slo-
serving-5/) put a step carrying any prefill at about 20 ms above a decode-only one whatever the
chunk: if the surcharge is fixed (host work and kernel launches of the eager forward), prefill
should come in few large chunks, or mixed steps need CUDA graphs too (they have them now:
pagedserve/worker/mixed_graphs.py; --mixed-graph-max-tokens 0 measures without). This measures the surcharge
directly: mixed(N, P) - decode(N), its fixed part (P = 16) and its per-token slope, and with
--enforce-eager a decode step without the graph. --profile adds, for the smallest P, the step's
host (CPU) time and its kernel launches from torch.profiler.

The engine is synchronous (the step returns after its tokens are read back, so wall time is the
step's), prefix caching off (every prompt is new), prompts of random non-zero token ids. The
decode row's floor is benchmarks/latency.py's (weight bytes over the copy bandwidth); the
surcharge has none (it is what the eager path adds). On the CPU with the default tiny model it
only checks that the script runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from benchmarks.common import environment, print_table, write_json
from pagedserve.config import EngineArgs
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.sampling_params import SamplingParams
from pagedserve.testing.checkpoints import build_checkpoint


def _prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(length)]


def _timed_step(engine: LLMEngine, finishing: str | None = None) -> float:
    """The step's wall seconds; finishing: a request that must finish in it (a one-token
    request whose whole prompt this step prefills), else the row would time something else."""
    t0 = time.perf_counter()
    outputs = engine.step()
    seconds = time.perf_counter() - t0
    if finishing is not None and not any(o.request_id == finishing and o.finished for o in outputs):
        raise RuntimeError(f"{finishing}: its prompt was not prefilled in one step (raise the token budget)")
    return seconds


def _profile_step(engine: LLMEngine, finishing: str) -> dict[str, float]:
    """One step under torch.profiler: its host time (the step's wall, CPU-side) and launches."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        wall = _timed_step(engine, finishing=finishing)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    cuda_us = sum(e.self_device_time_total for e in events) if torch.cuda.is_available() else 0.0
    return {"profiled_wall_ms": 1e3 * wall, "kernel_launches": float(launches), "cuda_ms": cuda_us / 1e3}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = args.model or build_checkpoint("/tmp/mixed-step-llama", "llama")
    n_max, p_max = max(args.decodes), max(args.prefill)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model, max_num_seqs=n_max + 1, max_num_batched_tokens=n_max + p_max, max_model_len=args.max_model_len,
        enable_prefix_caching=False, enforce_eager=args.enforce_eager, async_scheduling=False,
        mixed_graph_max_tokens=args.mixed_graph_max_tokens))  # fmt: skip
    vocab = engine.vocab_size
    rng = random.Random(0)
    decoding = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
    one_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    rows: list[dict[str, Any]] = []
    running = 0
    for n in sorted(args.decodes):
        while running < n:  # the batch grows to n decoding requests (short prompts)
            engine.add_request(f"d{running}", _prompt(rng, args.decode_prompt, vocab), decoding)
            running += 1
        for _ in range(args.warmup):  # prompts prefilled, graphs captured, allocator settled
            engine.step()
        decode = [_timed_step(engine) for _ in range(args.repeats)]
        row: dict[str, Any] = {"decodes": n, "prefill": 0, "step_ms": 1e3 * statistics.median(decode),
                               "surcharge_ms": 0.0}  # fmt: skip
        rows.append(row)
        base = row["step_ms"]
        for p in sorted(args.prefill):
            times = []
            for r in range(args.repeats + 1):  # the first is a warm-up (a new prefill shape)
                rid = f"p{n}-{p}-{r}"
                engine.add_request(rid, _prompt(rng, p, vocab), one_token)
                times.append(_timed_step(engine, finishing=rid))
                engine.step()  # the one-token request leaves; back to n decodes
            step = 1e3 * statistics.median(times[1:])
            rows.append({"decodes": n, "prefill": p, "step_ms": step, "surcharge_ms": step - base})
        if args.profile:
            engine.add_request(f"prof{n}", _prompt(rng, min(args.prefill), vocab), one_token)
            rows[-len(args.prefill)].update(_profile_step(engine, f"prof{n}"))
            engine.step()
    if args.profile:  # one column set for the table: NaN where not profiled
        keys = ("profiled_wall_ms", "kernel_launches", "cuda_ms")
        rows = [{**r, **{k: r.get(k, float("nan")) for k in keys}} for r in rows]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: a tiny random Llama built here")
    parser.add_argument("--decodes", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--prefill", type=int, nargs="+", default=[16, 128, 512, 2048])
    parser.add_argument("--decode-prompt", type=int, default=32, help="prompt tokens of each decoding request")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true", help="decode steps eager too (no CUDA graph)")
    parser.add_argument("--mixed-graph-max-tokens", type=int, default=1024,
                        help="steps with prefill up to this many tokens replay CUDA graphs (0: eager)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = run(args)
    env = environment()
    print_table(f"Step time, N decodes + one P-token prefill ({env['device']}, "
                f"{'eager' if args.enforce_eager else f'CUDA graphs, steps with prefill up to {args.mixed_graph_max_tokens} tokens'})",
                rows)
    write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
