"""Offline throughput of pagedserve on the fixed ShareGPT-like mix (ignore_eos), plus start-up
time and KV cache capacity; with --workload, on named workloads (benchmarks/workload.py), each
beside its roofline (benchmarks/roofline.py) from a matmul rate and a copy bandwidth measured
first, in the same run.

    python -m benchmarks.throughput --model DIR [--num-requests 1000] [--json OUT.json]
    python -m benchmarks.throughput --model DIR --workload all            # or a,b,...
    python -m benchmarks.throughput --tiny --workload all                 # CPU, tiny model, seconds

--max-num-seqs / --max-num-batched-tokens left unset: the engine's defaults for the device
(pagedserve/batch_defaults.py); long-outputs runs at its own 256 concurrent unless --max-num-seqs.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import measure_copy_bandwidth, measure_matmul_rate, print_table, write_json
from benchmarks.roofline import roofline
from benchmarks.workload import WORKLOADS, NamedWorkload, engine_settings, named_workload


def run(model: str, num_requests: int, max_num_seqs: int | None, max_num_batched_tokens: int | None,
        enforce_eager: bool, gpu_memory_utilization: float, load_format: str = "auto",
        max_model_len: int = 4096, device: str = "auto") -> dict:
    """The mix, on an engine started here (start-up timed)."""
    started = time.perf_counter()
    llm = _start(model, max_num_seqs, max_num_batched_tokens, enforce_eager, gpu_memory_utilization,
                 load_format, max_model_len=max_model_len, device=device)
    startup = time.perf_counter() - started
    return {**measure(llm, num_requests), "startup_s": startup}


def _start(model: str, max_num_seqs: int | None, max_num_batched_tokens: int | None, enforce_eager: bool,
           gpu_memory_utilization: float, load_format: str, max_model_len: int, **kwargs: Any) -> Any:
    from pagedserve import LLM

    return LLM(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,  # type: ignore[arg-type]
               enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
               max_model_len=max_model_len, load_format=load_format, **kwargs)


def measure(llm: Any, num_requests: int, workload: NamedWorkload | None = None) -> dict:
    """A workload (default: the mix) through an LLM that is already up (its start-up is the
    caller's to time)."""
    from pagedserve import SamplingParams

    core = llm.llm_engine.engine_core
    # the mix fits max_model_len 4096 uncut (prompts and outputs are at most 2048 each)
    named = workload or named_workload("sharegpt", core.runner.vocab_size, num_requests,
                                       max_model_len=core.config.scheduler_config.max_model_len)
    work = named.work
    params = [SamplingParams(**kw, ignore_eos=True, max_tokens=n) for kw, n in zip(named.sampling, work.output_lens)]
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    # warm-up on a few requests so that Triton compilation is not timed
    llm.generate(prompts[:8], params[:8], use_tqdm=False)
    steps_before, tokens_before, hits_before = core.stats.num_steps, core.stats.num_scheduled_tokens, _hits(core)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == work.num_output_tokens, (produced, work.num_output_tokens)
    result = {
        "engine": "pagedserve",
        "requests": len(prompts),
        "elapsed_s": elapsed,
        "requests_per_s": len(prompts) / elapsed,
        "output_tokens_per_s": produced / elapsed,
        "total_tokens_per_s": (produced + work.num_input_tokens) / elapsed,
        "steps": core.stats.num_steps - steps_before,
        "model_load_s": core.stats.extra.get("model_load_seconds", 0.0),
        "graph_capture_s": core.stats.extra.get("cuda_graph_capture_seconds", 0.0),
        "kv_capacity_tokens": core.kv_capacity_tokens,
        "kv_slot_waste": core.stats.kv_slot_waste,
        "preemptions": core.stats.last.num_preemptions if core.stats.last else 0,
    }
    if workload is not None:
        result["computed_tokens"] = core.stats.num_scheduled_tokens - tokens_before
        result["prefix_hit_tokens"] = _hits(core) - hits_before
    return result


def _hits(core: Any) -> int:
    return core.stats.last.prefix_cache_hits if core.stats.last else 0


def measure_rates(device: str) -> dict[str, float]:
    """The two rates the rooflines divide by, measured before the engine takes the memory."""
    if device == "cuda":
        return {"matmul_flops_per_s": measure_matmul_rate(8192, device="cuda"),
                "copy_bytes_per_s": measure_copy_bandwidth(2 << 30, device="cuda")}
    # the CPU path runs float32 (the tiny checkpoints' dtype), so its matmul rate is float32's
    return {"matmul_flops_per_s": measure_matmul_rate(512, repeats=10, device="cpu", dtype=torch.float32),
            "copy_bytes_per_s": measure_copy_bandwidth(64 << 20, repeats=10, device="cpu")}


def workload_row(llm: Any, named: NamedWorkload, rates: dict[str, float]) -> dict[str, Any]:
    """One workload through `llm`, beside its roofline."""
    core = llm.llm_engine.engine_core
    result = measure(llm, len(named.work.prompts), named)
    n = len(named.work.prompts)
    sched = core.config.scheduler_config
    line = roofline_row(llm, [len(p) for p in named.work.prompts], named.work.output_lens,
                        [result["prefix_hit_tokens"] // n] * n, rates, result["elapsed_s"])
    return {"workload": named.name, "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens, **result,
            **line, "notes": "; ".join(named.notes)}


def roofline_row(llm: Any, prompt_lens: list[int], output_lens: list[int], cached_lens: list[int],
                 rates: dict[str, float], elapsed_s: float) -> dict[str, Any]:
    """The roofline of these requests on llm's model and limits, beside elapsed_s
    (benchmarks.roofline; also used by benchmarks/speed_round.py)."""
    core = llm.llm_engine.engine_core
    spec = llm.llm_engine.model_config.model_spec
    runner = core.runner
    weight_bytes = sum(t.numel() * t.element_size() for t in (*runner.model.parameters(), *runner.model.buffers()))
    if not spec.tie_word_embeddings:  # the embedding table is gathered by row, not read whole each step
        weight_bytes = max(0, weight_bytes - spec.vocab_size * spec.hidden_size * runner.dtype.itemsize)
    sched = core.config.scheduler_config
    line = roofline(spec, prompt_lens, output_lens, cached_lens, weight_bytes, runner.dtype.itemsize,
                    sched.max_num_seqs, sched.max_num_batched_tokens,
                    rates["matmul_flops_per_s"], rates["copy_bytes_per_s"])
    return line.row(elapsed_s)


def run_workloads(args: argparse.Namespace, names: list[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each named workload; one engine per distinct engine setting (in order of first use)."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rates = measure_rates(device)
    scale = 0.05 if args.tiny else 1.0
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name in names:
        settings = engine_settings(name)
        seqs = args.max_num_seqs if args.max_num_seqs is not None else settings["max_num_seqs"]
        groups.setdefault((seqs, settings["enable_prefix_caching"]), []).append(name)
    rows: list[dict[str, Any]] = []
    for (seqs, prefix_caching), group in groups.items():
        started = time.perf_counter()
        llm = _start(args.model, seqs, args.max_num_batched_tokens, args.enforce_eager,
                     args.gpu_memory_utilization, args.load_format, args.max_model_len,
                     enable_prefix_caching=prefix_caching, device=device)
        startup = time.perf_counter() - started
        vocab = llm.llm_engine.engine_core.runner.vocab_size
        for name in group:
            named = named_workload(name, vocab, args.num_requests, scale, max_model_len=args.max_model_len)
            rows.append({**workload_row(llm, named, rates), "startup_s": startup})
        llm.llm_engine.shutdown()
        del llm
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (--tiny: built if not given)")
    parser.add_argument("--num-requests", type=int, default=None, help="default 1000 (--tiny: 32)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's for the device")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None, help="default 4096 (--tiny: 512)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--load-format", default="auto", help='"dummy": random weights, config only')
    parser.add_argument("--workload", default=None,
                        help=f"comma-separated names or 'all' ({', '.join(WORKLOADS)}); each beside its roofline")
    parser.add_argument("--tiny", action="store_true", help="CPU, a tiny model, lengths x0.05: a quick check")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.device = "cpu" if args.device == "auto" else args.device
        args.num_requests = args.num_requests or 32
        args.max_model_len = args.max_model_len or 512
        if args.model is None:
            from pagedserve.testing.checkpoints import build_checkpoint

            args.model = build_checkpoint(tempfile.mkdtemp(prefix="pagedserve-tiny-"), "llama")
    args.num_requests = args.num_requests or 1000
    args.max_model_len = args.max_model_len or 4096
    if args.model is None:
        parser.error("--model is required (or --tiny)")
    if args.workload is None:
        result = run(args.model, args.num_requests, args.max_num_seqs, args.max_num_batched_tokens,
                     args.enforce_eager, args.gpu_memory_utilization, args.load_format, args.max_model_len,
                     args.device)
        print_table("offline throughput (ShareGPT-like mix, ignore_eos)", [result])
        write_json(args.json, {"throughput": result, "args": vars(args)})
        return
    names = list(WORKLOADS) if args.workload == "all" else [n.strip() for n in args.workload.split(",")]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    rows, rates = run_workloads(args, names)
    print(f"\nmeasured: matmul {rates['matmul_flops_per_s'] / 1e12:,.3f} TFLOP/s, "
          f"copy {rates['copy_bytes_per_s'] / 1e9:,.1f} GB/s")
    keys = ("workload", "max_num_seqs", "max_num_batched_tokens", "requests", "elapsed_s", "output_tokens_per_s",
            "total_tokens_per_s", "roofline_s", "bound", "roofline_fraction", "prefix_hit_tokens", "preemptions")
    print_table("offline throughput by workload, beside the roofline (ignore_eos)",
                [{k: r[k] for k in keys} for r in rows])
    write_json(args.json, {"workloads": rows, "rates": rates, "args": vars(args)})


if __name__ == "__main__":
    main()
