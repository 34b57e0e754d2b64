"""Offline throughput of pagedserve on the fixed ShareGPT-like mix (ignore_eos), plus start-up
time and KV cache capacity.

    python -m benchmarks.throughput --model DIR [--num-requests 1000] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import print_table, write_json
from benchmarks.workload import sharegpt_like


def run(model: str, num_requests: int, max_num_seqs: int, max_num_batched_tokens: int | None,
        enforce_eager: bool, gpu_memory_utilization: float, load_format: str = "auto") -> dict:
    from pagedserve import LLM

    started = time.perf_counter()
    llm = LLM(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
              enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
              max_model_len=4096, load_format=load_format)
    startup = time.perf_counter() - started
    return {**measure(llm, num_requests), "startup_s": startup}


def measure(llm, num_requests: int) -> dict:
    """The mix through an LLM that is already up (its start-up is the caller's to time)."""
    from pagedserve import SamplingParams

    core = llm.llm_engine.engine_core
    vocab = core.runner.vocab_size
    work = sharegpt_like(vocab, num_requests)
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n)
              for n in work.output_lens]
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    # warm-up on a few requests so that Triton compilation is not timed
    llm.generate(prompts[:8], params[:8], use_tqdm=False)
    steps_before = core.stats.num_steps
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == work.num_output_tokens, (produced, work.num_output_tokens)
    return {
        "engine": "pagedserve",
        "requests": num_requests,
        "elapsed_s": elapsed,
        "requests_per_s": num_requests / elapsed,
        "output_tokens_per_s": produced / elapsed,
        "total_tokens_per_s": (produced + work.num_input_tokens) / elapsed,
        "steps": core.stats.num_steps - steps_before,
        "model_load_s": core.stats.extra.get("model_load_seconds", 0.0),
        "graph_capture_s": core.stats.extra.get("cuda_graph_capture_seconds", 0.0),
        "kv_capacity_tokens": core.kv_capacity_tokens,
        "kv_slot_waste": core.stats.kv_slot_waste,
        "preemptions": core.stats.last.num_preemptions if core.stats.last else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--load-format", default="auto", help='"dummy": random weights, config only')
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args.model, args.num_requests, args.max_num_seqs, args.max_num_batched_tokens,
                 args.enforce_eager, args.gpu_memory_utilization, args.load_format)
    print_table("offline throughput (ShareGPT-like mix, ignore_eos)", [result])
    write_json(args.json, {"throughput": result, "args": vars(args)})


if __name__ == "__main__":
    main()
