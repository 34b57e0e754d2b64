"""Where a batch-1 decode step's time goes: GEMV rates at M=1, the kernels of one step, and the
host phases of LLMEngine.step (wall clock, no added syncs).

    python -m benchmarks.profile_decode --model DIR [--context 128] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import torch

from benchmarks.common import measure_copy_bandwidth, print_table, time_cuda_ms, write_json


def gemv_rates(bandwidth: float) -> list[dict[str, Any]]:
    """cuBLAS at M=1 for the Llama-3-8B projection shapes (out x in)."""
    rows = []
    for name, (n, k) in {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                         "down": (4096, 14336), "lm_head": (128256, 4096)}.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        ms = time_cuda_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w))
        nbytes = w.numel() * 2
        rows.append({"gemv": name, "us": ms * 1e3, "TB_per_s": nbytes / ms / 1e9,
                     "floor_us": nbytes / bandwidth * 1e6})
    return rows


class PhaseTimer:
    """Wraps methods to sum their wall time per call (no syncs added)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)

    def wrap(self, obj: Any, attr: str, label: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.totals[label] += time.perf_counter() - started

        setattr(obj, attr, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    bandwidth = measure_copy_bandwidth()
    gemvs = gemv_rates(bandwidth)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print_table("cuBLAS GEMV at M=1", gemvs)

    from pagedserve import EngineArgs, LLMEngine, SamplingParams

    engine = LLMEngine.from_engine_args(EngineArgs(model=args.model, max_model_len=4096, max_num_seqs=256))
    core = engine.engine_core
    runner = core.runner
    timer = PhaseTimer()
    timer.wrap(core.scheduler, "schedule", "schedule")
    timer.wrap(core.scheduler, "update_from_output", "update_from_output")
    timer.wrap(runner, "_prepare_inputs", "prepare_inputs")
    if runner.decode_graphs is not None:
        timer.wrap(runner.decode_graphs, "run", "graph_copy_and_replay")
    timer.wrap(runner, "_sample", "sample (incl. wait for GPU)")
    timer.wrap(runner, "execute_model", "execute_model (all)")
    timer.wrap(core, "step", "engine_core.step (all)")
    timer.wrap(engine, "step", "LLMEngine.step (all)")

    prompt = torch.randint(100, runner.vocab_size - 100, (args.context,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 1, ignore_eos=True)
    for attempt in range(2):  # the first pass warms everything up
        timer.totals.clear()
        engine.add_request(f"p{attempt}", {"prompt_token_ids": prompt}, params)
        engine.step()
        timer.totals.clear()
        started = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        wall = time.perf_counter() - started
    phases = [{"phase": k, "ms_per_step": v / steps * 1e3} for k, v in timer.totals.items()]
    phases.append({"phase": "loop wall", "ms_per_step": wall / steps * 1e3})
    print_table(f"host phases, batch 1, context {args.context}", phases)

    # Kernels of a few real steps.
    from torch.profiler import ProfilerActivity, profile

    engine.add_request("prof", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    engine.step()
    engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    _kernel_table(prof, "GPU kernels per step, engine steps (graphs replayed)")
    graphs = runner.decode_graphs
    if graphs is not None:  # the same forward, eager: every kernel launched by hand
        eager_args = (graphs.input_ids[:1], graphs.positions[:1], runner.kv_caches, graphs._metadata(1))
        with torch.inference_mode():
            runner.model(*eager_args)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    runner.model(*eager_args)
                torch.cuda.synchronize()
        _kernel_table(prof, "GPU kernels per forward, eager")
    write_json(args.json, {"gemv": gemvs, "phases": phases, "bandwidth_bytes_per_s": bandwidth,
                           "args": vars(args)})


def _kernel_table(prof: Any, title: str) -> None:
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kernels: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        kernels[e.name[:90]].append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    krows = sorted(({"kernel": k, "calls_per_step": len(v) / 10, "us_per_step": sum(v) / 10}
                    for k, v in kernels.items()), key=lambda r: -r["us_per_step"])
    busy = sum(r["us_per_step"] for r in krows)
    print_table(f"{title} (sum {busy:.0f} us)", krows[:40])
    starts = sorted((e.time_range.start, e.time_range.end) for e in events)
    if starts:
        span = (starts[-1][1] - starts[0][0]) / 10
        print(f"GPU span per step {span:.0f} us, busy {busy:.0f} us, idle {span - busy:.0f} us")


if __name__ == "__main__":
    main()
