"""Issue 13's table, before against after in one run: each row (a workload at an engine setting)
runs on every tree given, alternating, each run in its own process (a fresh engine, its own GPU
memory; an out-of-memory failure is recorded as the row's result, not the script's end).

    python -m benchmarks.speed_round --model DIR --tree new=. --tree old=.cmp/old \
        [--rows defaults,512x8192,...] [--profile new] [--json OUT.json]
    python -m benchmarks.speed_round --tiny --tree new=.        # CPU, a tiny model, seconds

A tree is a directory holding a `pagedserve/` package (for an old commit:
`git archive COMMIT pagedserve | tar -x -C DIR`); its process runs with that directory first on
PYTHONPATH and this checkout's `benchmarks/` after it. The worker touches only what every tree
since ba75a98 has: `LLM(...)`, `SamplingParams`, `generate`, `LLMEngine.add_request / step`,
`engine_core.stats.num_steps`, `engine_core.runner.model / vocab_size`. The workloads are built
here (benchmarks/workload.py) and handed to the worker as plain token lists, so every tree runs
exactly the same requests. The roofline (benchmarks/roofline.py) is computed where the tree has a
model spec (the current one); `--profile LABEL` adds, for that tree's runs, a torch.profiler
window of engine steps: device time per step by kernel class beside the step's wall time, the
figures the gaps are explained from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import environment, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
GPU_MEMORY_UTILIZATION = 0.9
MAX_MODEL_LEN = 4096
SYNC_AUDIT_STEPS = 5  # steps before the profile window whose host syncs are counted
TINY_SCALE, TINY_MAX_MODEL_LEN, TINY_REQUEST_FRACTION = 0.05, 512, 0.032  # --tiny: lengths, requests


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    workload: str  # a benchmarks.workload name, or "batch1" (one request's decode rate)
    engine: dict[str, Any] = field(default_factory=dict)  # LLM kwargs; {}: the tree's defaults
    requests: int = 1000
    goal: str = ""


ROWS: dict[str, Row] = {r.name: r for r in (
    Row("defaults", "sharegpt", goal=">= 12,000 output tok/s at the defaults"),
    Row("512x8192", "sharegpt", {"max_num_seqs": 512, "max_num_batched_tokens": 8192}),
    Row("256x2048-sync", "sharegpt", {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "async_scheduling": False}),
    Row("256x2048-async", "sharegpt", {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "async_scheduling": True},
        goal="async on by default"),
    Row("1024x16384", "sharegpt", {"max_num_seqs": 1024, "max_num_batched_tokens": 16384},
        goal="runs at gpu_memory_utilization 0.9 (no OOM)"),
    Row("realistic-sampling", "realistic-sampling", goal="within 10% of plain sampling (the defaults row)"),
    Row("batch1", "batch1", requests=1, goal=">= 92% of the bandwidth floor by default (context 128)"),
    Row("long-prompts", "long-prompts", requests=200, goal=">= 70% of the compute roofline"),
    Row("long-outputs", "long-outputs", {"max_num_seqs": 256}, requests=256, goal=">= 20,000 output tok/s"),
    Row("shared-prefix", "shared-prefix", requests=500),
)}

# kernel classes of a profile, by CUDA kernel name (first match wins)
KERNEL_CLASSES: tuple[tuple[str, str], ...] = (
    ("gemm", r"gemm|gemv|cutlass|xmma|nvjet|cublas|_mma_kernel|matmul|sm90_"),
    ("attention", r"attention|attn|_prefill_kernel|_decode_kernel|_decode_partition|paged|flash"),
    ("sampler", r"sampl|topk|top_k|sort|softmax|multinomial|argmax|penalt|gumbel|exponential"),
    ("norm/rotary/act", r"rms|norm|rotary|rope|silu|act_and_mul"),
    ("copy/fill", r"copy|memcpy|memset|fill|cat|index|gather|scatter"),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, pattern in KERNEL_CLASSES:
        if re.search(pattern, low):
            return label
    return "other"


# ---------------------------------------------------------------------------------- the worker


def _engine_limits(core: Any) -> dict[str, Any]:
    sched = getattr(getattr(core, "config", None), "scheduler_config", None)
    return {"max_num_seqs": getattr(sched, "max_num_seqs", None),
            "max_num_batched_tokens": getattr(sched, "max_num_batched_tokens", None),
            "async_scheduling": getattr(core, "async_scheduling", None)}


def _profiled_generate(llm: Any, prompts: list[Any], params: list[Any], first_step: int,
                       steps: int) -> tuple[list[Any], dict[str, Any]]:
    """llm.generate with a torch.profiler window over engine steps first_step .. + steps: device
    time per step by kernel class, and the window's wall time per step (profiler overhead in it);
    and, over the SYNC_AUDIT_STEPS steps before the window, the host's waits for the GPU by call
    site (benchmarks/host_syncs.py)."""
    from collections import Counter

    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.host_syncs import host_sync_sites

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    engine = llm.llm_engine
    step = engine.step
    state: dict[str, Any] = {"n": 0, "prof": None, "t0": 0.0, "wall": 0.0, "done": False, "audited": 0}
    syncs: Counter[str] = Counter()

    def profiled_step() -> Any:
        if state["n"] == first_step:
            sync()
            state["prof"] = profile(activities=activities)
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        if first_step - SYNC_AUDIT_STEPS <= state["n"] < first_step:
            state["audited"] += 1
            with host_sync_sites(syncs):
                out = step()
        else:
            out = step()
        state["n"] += 1
        if state["n"] == first_step + steps and state["prof"] is not None and not state["done"]:
            sync()
            state["wall"] = time.perf_counter() - state["t0"]
            state["prof"].__exit__(None, None, None)
            state["done"] = True
        return out

    engine.step = profiled_step
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        engine.step = step
    prof = state["prof"]
    if prof is None or not state["done"]:
        return outputs, {"profile_error": f"the run ended after {state['n']} steps, before the window"}
    by_class: dict[str, float] = {}
    top: list[tuple[float, str, int]] = []
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.self_device_time_total <= 0:
            continue
        us = event.self_device_time_total
        by_class[kernel_class(event.key)] = by_class.get(kernel_class(event.key), 0.0) + us
        top.append((us, event.key, event.count))
    top.sort(reverse=True)
    device_ms = sum(by_class.values()) / 1e3 / steps
    return outputs, {
        "profile_steps": steps, "profile_first_step": first_step,
        "profile_wall_ms_per_step": 1e3 * state["wall"] / steps,
        "profile_device_ms_per_step": device_ms,
        "profile_class_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "profile_top_kernels": [{"kernel": k[:120], "ms_per_step": us / 1e3 / steps, "calls_per_step": c / steps}
                                for us, k, c in top[:12]],
        "profile_host_syncs_per_step": {site: n / max(state["audited"], 1) for site, n in syncs.most_common()},
    }


def _prefix_hits(core: Any) -> int | None:
    last = getattr(core.stats, "last", None)
    return getattr(last, "prefix_cache_hits", None) if last is not None else None


def _roofline(llm: Any, work: dict[str, Any], elapsed: float, rates: dict[str, float], hits: int | None) -> dict[str, Any]:
    """The roofline row (benchmarks.roofline) where the tree has a model spec; {} otherwise.
    Cached prompt tokens: the prefix-cache hits measured in the run, spread evenly."""
    if getattr(llm.llm_engine.model_config, "model_spec", None) is None:
        return {}
    from benchmarks.throughput import roofline_row

    n = len(work["prompts"])
    cached = hits if hits is not None else work["shared_prefix_len"] * n
    return {**roofline_row(llm, [len(p) for p in work["prompts"]], work["output_lens"], [cached // n] * n,
                           rates, elapsed), "prefix_hit_tokens": cached}


def _unseen(prompts: list[Any], vocab: int) -> list[Any]:
    """The same requests with every prompt's first token moved by one: none of them hits a prefix
    cached by the timed run (the block hashes chain from the first token), yet prompts that share
    a prefix still share it with each other."""
    return [{"prompt_token_ids": [100 + (p["prompt_token_ids"][0] - 99) % (vocab - 200), *p["prompt_token_ids"][1:]]}
            for p in prompts]


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One row on the tree this process imports: spec = {model, row, work, device, rates, profile}."""
    import torch

    from pagedserve import LLM, SamplingParams

    row = Row(**spec["row"])
    on_cpu = spec["device"] == "cpu"
    kwargs: dict[str, Any] = {"max_model_len": spec["max_model_len"], **row.engine,
                              **({"device": "cpu"} if on_cpu else {"gpu_memory_utilization": GPU_MEMORY_UTILIZATION})}
    if "enable_prefix_caching" in spec["work"]:
        kwargs["enable_prefix_caching"] = spec["work"]["enable_prefix_caching"]
    result: dict[str, Any] = {"row": row.name, "workload": row.workload, "engine_args": row.engine}
    started = time.perf_counter()
    llm = LLM(spec["model"], **kwargs)
    result["startup_s"] = time.perf_counter() - started
    core = llm.llm_engine.engine_core
    result.update(_engine_limits(core))
    if row.workload == "batch1":
        from benchmarks.latency import decode_rate, decode_weight_bytes

        vocab = core.runner.vocab_size
        decode_rate(llm.llm_engine, 64, 16, vocab)  # warm-up
        context, tokens = spec["work"]["context"], spec["work"]["tokens"]
        rate = decode_rate(llm.llm_engine, context, tokens, vocab)
        weights = decode_weight_bytes(core.runner.model, spec["work"]["tied"])
        kv = spec["work"]["kv_bytes_per_token"] * (context + tokens / 2)
        floor = spec["rates"]["copy_bytes_per_s"] / (weights + kv)
        result.update({"context": context, "tokens_per_s": rate, "weight_bytes": weights,
                       "floor_tokens_per_s": floor, "fraction_of_floor": rate / floor})
        return result
    work = spec["work"]
    params = [SamplingParams(**kw, ignore_eos=True, max_tokens=n) for kw, n in zip(work["sampling"], work["output_lens"])]
    prompts = [{"prompt_token_ids": p} for p in work["prompts"]]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # Triton compiles, not timed
    steps_before, hits_before = core.stats.num_steps, _prefix_hits(core)
    t0 = time.perf_counter()
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    except torch.cuda.OutOfMemoryError as exc:
        result["error"] = f"CUDA out of memory after {time.perf_counter() - t0:.1f} s: {str(exc).splitlines()[0][:200]}"
        return result
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    result.update({
        "requests": len(prompts), "elapsed_s": elapsed, "steps": core.stats.num_steps - steps_before,
        "output_tokens": produced, "expected_output_tokens": sum(work["output_lens"]),
        "output_tokens_per_s": produced / elapsed,
        "total_tokens_per_s": (produced + sum(len(p) for p in work["prompts"])) / elapsed,
    })
    hits_after = _prefix_hits(core)
    hits = hits_after - hits_before if hits_after is not None and hits_before is not None else None
    result.update(_roofline(llm, work, elapsed, spec["rates"], hits))
    if spec["profile"]:  # a second pass of the same requests (none cached), a window a third in
        steps = result["steps"]
        _, prof = _profiled_generate(llm, _unseen(prompts, core.runner.vocab_size), params,
                                     first_step=max(1, steps // 3), steps=min(30, max(1, steps // 4)))
        result.update(prof)
    return result


# ---------------------------------------------------------------------------------- the driver


def _model_facts(model: str) -> dict[str, Any]:
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads", heads)
    dtype_bytes = 4 if cfg.get("torch_dtype", cfg.get("dtype")) == "float32" else 2
    return {"vocab_size": cfg["vocab_size"], "tied": bool(cfg.get("tie_word_embeddings", False)),
            "kv_bytes_per_token": 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes}


def build_work(row: Row, facts: dict[str, Any], scale: float, request_fraction: float,
               max_model_len: int) -> dict[str, Any]:
    """The row's requests as plain lists (what every tree's worker can read)."""
    if row.workload == "batch1":
        return {"context": max(8, round(128 * scale)), "tokens": max(8, round(256 * scale)),
                "kv_bytes_per_token": facts["kv_bytes_per_token"], "tied": facts["tied"]}
    from benchmarks.workload import named_workload

    n = max(2, round(row.requests * request_fraction))
    named = named_workload(row.workload, facts["vocab_size"], n, scale, max_model_len=max_model_len)
    work: dict[str, Any] = {"prompts": named.work.prompts, "output_lens": named.work.output_lens,
                            "sampling": named.sampling, "shared_prefix_len": named.shared_prefix_len,
                            "enable_prefix_caching": named.enable_prefix_caching}
    return work


def run_one(tree: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """spec's row in a fresh process on `tree` (its pagedserve first on the path)."""
    with tempfile.TemporaryDirectory(prefix="speed-round-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(tree), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.speed_round", "--worker", spec_path, out_path],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"row": spec["row"]["name"], "error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not os.path.exists(out_path):
            tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-3:]
            return {"row": spec["row"]["name"], "error": f"exit {proc.returncode}: {' | '.join(tail)[-400:]}",
                    "process_s": wall}
        with open(out_path) as f:
            result = json.load(f)
        result["process_s"] = wall
        return result


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per run: the row's figure and, where the row has a twin, the ratio it is judged by."""
    by_key = {(r["row"], r["tree"]): r for r in results}
    lines = []
    for r in results:
        figure = r.get("tokens_per_s") if r.get("workload") == "batch1" else r.get("output_tokens_per_s")
        line = {"row": r["row"], "tree": r["tree"], "output_tok_s": figure,
                "seqs": r.get("max_num_seqs"), "batched_tokens": r.get("max_num_batched_tokens"),
                "async": r.get("async_scheduling"), "steps": r.get("steps"),
                "vs_floor_or_roofline": r.get("fraction_of_floor", r.get("roofline_fraction")),
                "error": r.get("error", "")}
        if r["row"] == "realistic-sampling" and (plain := by_key.get(("defaults", r["tree"]))) and figure:
            line["vs_plain"] = figure / plain["output_tokens_per_s"] if plain.get("output_tokens_per_s") else None
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                        help="a tree to run (repeatable; run in the order given, alternating per row)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated ({', '.join(ROWS)})")
    parser.add_argument("--profile", default="", help="comma-separated tree labels whose runs also profile")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each row on each tree")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take")
    parser.add_argument("--tiny", action="store_true", help="CPU, a tiny model, lengths x0.05, 3%% of the requests")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.worker:
        with open(args.worker[0]) as f:
            spec = json.load(f)
        result = run_worker(spec)
        with open(args.worker[1], "w") as f:
            json.dump(result, f)
        return
    trees = dict(t.split("=", 1) for t in args.tree) or {"new": str(ROOT)}
    rows = [ROWS[name.strip()] for name in args.rows.split(",") if name.strip()]
    profiled = {p for p in args.profile.split(",") if p}
    device = "cpu" if args.tiny else "cuda"
    if args.tiny and args.model is None:
        from pagedserve.testing.checkpoints import build_checkpoint

        args.model = build_checkpoint(tempfile.mkdtemp(prefix="pagedserve-tiny-"), "llama")
    if args.model is None:
        parser.error("--model is required (or --tiny)")
    scale, fraction, max_model_len = (TINY_SCALE, TINY_REQUEST_FRACTION, TINY_MAX_MODEL_LEN) if args.tiny \
        else (1.0, 1.0, MAX_MODEL_LEN)
    from benchmarks.throughput import measure_rates

    rates = measure_rates(device)  # before any engine takes the memory
    facts = _model_facts(args.model)
    results: list[dict[str, Any]] = []
    for row in rows:
        work = build_work(row, facts, scale, fraction, max_model_len)
        for rep in range(args.repeat):
            for label, tree in trees.items():
                spec = {"model": args.model, "row": asdict(row), "work": work, "device": device, "rates": rates,
                        "profile": label in profiled, "max_model_len": max_model_len}
                result = {"tree": label, "repeat": rep, **run_one(tree, spec, args.timeout)}
                results.append(result)
                shown = {k: v for k, v in result.items() if not k.startswith("profile_")}
                print(json.dumps(shown, default=str), flush=True)
                write_json(args.json, {"results": results, "rates": rates, "trees": trees,
                                       "goals": {r.name: r.goal for r in rows}, "env": environment()})
    print_table("issue 13: before / after (output tok/s; batch1: tok/s of one request)", summary(results))


if __name__ == "__main__":
    main()
