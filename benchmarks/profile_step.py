"""Where an offline-throughput step spends its time: per-step wall time by kind (decode-only vs
mixed prefill/decode), the scheduler's share, and a torch.profiler window of mixed steps (CPU
and CUDA time per op, kernel launches per step). Used to compare two trees side by side.

    python -m benchmarks.profile_step --model DIR [--num-requests 1000] [--json OUT.json]

The workload and engine settings are those of benchmarks/throughput.py (the ShareGPT-like mix,
temperature 1.0, ignore_eos, 256 seqs): the runner's sync path, which samples on the host every
step, so a step's wall time is host preparation + GPU work + sampling.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from benchmarks.common import print_table, write_json
from benchmarks.workload import sharegpt_like


def _median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values) if values else 0.0


def run(model: str, num_requests: int, profile_after: int, profile_steps: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pagedserve import LLM, SamplingParams

    llm = LLM(model, max_num_seqs=256, gpu_memory_utilization=0.9, max_model_len=4096)
    core = llm.llm_engine.engine_core
    runner = core.runner
    work = sharegpt_like(runner.vocab_size, num_requests)
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n)
              for n in work.output_lens]
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # Triton compilation, not timed

    decode_s: list[float] = []
    mixed_s: list[float] = []
    mixed_tokens: list[int] = []
    schedule_s: list[float] = []
    update_s: list[float] = []
    state: dict[str, Any] = {"calls": 0, "prof": None, "mixed_profiled": 0, "profiling": False}
    execute, schedule, update = runner.execute_model, core.scheduler.schedule, core.scheduler.update_from_output

    def timed_schedule() -> Any:
        t0 = time.perf_counter()
        plan = schedule()
        schedule_s.append(time.perf_counter() - t0)
        return plan

    def timed_update(plan: Any, output: Any) -> Any:
        t0 = time.perf_counter()
        result = update(plan, output)
        update_s.append(time.perf_counter() - t0)
        return result

    def timed_execute(plan: Any) -> Any:
        state["calls"] += 1
        tokens = plan.total_num_scheduled_tokens
        is_decode = tokens == len(plan.num_scheduled_tokens)
        if state["calls"] == profile_after:
            state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            state["prof"].__enter__()
            state["profiling"] = True
        t0 = time.perf_counter()
        output = execute(plan)
        elapsed = time.perf_counter() - t0
        if state["profiling"] and not is_decode:
            state["mixed_profiled"] += 1
        if state["calls"] == profile_after + profile_steps - 1:
            torch.cuda.synchronize()
            state["prof"].__exit__(None, None, None)
            state["profiling"] = False
        (decode_s if is_decode else mixed_s).append(elapsed)
        if not is_decode:
            mixed_tokens.append(tokens)
        return output

    runner.execute_model = timed_execute
    core.scheduler.schedule = timed_schedule
    core.scheduler.update_from_output = timed_update
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)

    prof = state["prof"]
    table = ""
    kernels = 0
    cuda_us = 0.0
    cpu_us = 0.0
    if prof is not None:
        events = prof.key_averages()
        table = events.table(sort_by="self_cuda_time_total", row_limit=25)
        table += "\n" + events.table(sort_by="self_cpu_time_total", row_limit=25)
        for event in events:
            if event.device_type == torch.autograd.DeviceType.CUDA:
                kernels += event.count
                cuda_us += event.self_device_time_total
            else:
                cpu_us += event.self_cpu_time_total
    return {
        "output_tokens_per_s": produced / elapsed,
        "elapsed_s": elapsed,
        "steps": len(decode_s) + len(mixed_s),
        "decode_steps": len(decode_s),
        "decode_step_ms_median": _median_ms(decode_s),
        "decode_total_s": sum(decode_s),
        "mixed_steps": len(mixed_s),
        "mixed_step_ms_median": _median_ms(mixed_s),
        "mixed_total_s": sum(mixed_s),
        "mixed_tokens_median": statistics.median(mixed_tokens) if mixed_tokens else 0,
        "schedule_ms_median": _median_ms(schedule_s),
        "update_ms_median": _median_ms(update_s),
        "profiled_steps": profile_steps,
        "profiled_mixed_steps": state["mixed_profiled"],
        "profiled_kernel_launches_per_step": kernels / profile_steps,
        "profiled_cuda_ms_per_step": cuda_us / 1e3 / profile_steps,
        "profiled_cpu_self_ms_per_step": cpu_us / 1e3 / profile_steps,
        "profile_table": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--profile-after", type=int, default=200, help="first profiled step")
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--label", default="")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args.model, args.num_requests, args.profile_after, args.profile_steps)
    table = result.pop("profile_table")
    print(table)
    print_table(f"step profile {args.label}", [result])
    write_json(args.json, {"profile": result, "profile_table": table, "args": vars(args)})


if __name__ == "__main__":
    main()
