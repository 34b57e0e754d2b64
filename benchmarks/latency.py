"""Batch-1 decode speed at a given context, beside its bandwidth floor.

floor tokens/s = copy bandwidth / (weight bytes read per token + KV bytes read per token), with
the bandwidth measured in this run (device-to-device copy, bytes read + written). The embedding
table is not read whole by a decode step (one row is gathered), so it is left out of the weights.

    python -m benchmarks.latency --model DIR [--contexts 128 2048] [--async-scheduling] [--json OUT.json]

The rate counts the tokens that arrive after the first one (which ends the prefill), over the time
from the first token to the last: with async scheduling a step() returns the tokens of the step
launched one call earlier, so counting step() calls would be off by one step.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import measure_copy_bandwidth, print_table, time_cuda_ms, write_json


def decode_rate(engine, context: int, num_tokens: int, vocab: int) -> float:
    from pagedserve import SamplingParams

    prompt = torch.randint(100, vocab - 100, (context,), generator=torch.Generator().manual_seed(context)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    engine.add_request(f"lat-{context}-{time.monotonic_ns()}", {"prompt_token_ids": prompt}, params)
    received = 0
    while received == 0:  # prefill, until the first token is back
        received = sum(len(o.outputs[0].token_ids) for o in engine.step())
    started = time.perf_counter()
    finished_at = started
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if outputs:
            received = max(received, max(len(o.outputs[0].token_ids) for o in outputs))
            finished_at = time.perf_counter()
    return (received - 1) / (finished_at - started)


def decode_weight_bytes(model: torch.nn.Module, tied: bool) -> int:
    """Weights a decode step reads: every parameter but a not-tied embedding table (one row of it
    is gathered per token)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if tied or "embed_tokens" not in n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--num-tokens", type=int, default=256)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from pagedserve import EngineArgs, LLMEngine

    bandwidth = measure_copy_bandwidth()
    engine = LLMEngine.from_engine_args(EngineArgs(model=args.model, enforce_eager=args.enforce_eager,
                                                   max_model_len=4096, max_num_seqs=256,
                                                   async_scheduling=args.async_scheduling))
    runner = engine.engine_core.runner
    spec = runner.spec
    element = torch.empty((), dtype=spec.dtype).element_size()
    weight_bytes = decode_weight_bytes(runner.model, runner.model_spec.tie_word_embeddings)
    kv_bytes_per_ctx = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element
    decode_rate(engine, 64, 16, runner.vocab_size)  # warm-up
    rows = []
    for context in args.contexts:
        rate = decode_rate(engine, context, args.num_tokens, runner.vocab_size)
        mean_ctx = context + args.num_tokens / 2
        floor = bandwidth / (weight_bytes + kv_bytes_per_ctx * mean_ctx)
        rows.append({
            "context": context,
            "tokens_per_s": rate,
            "floor_tokens_per_s": floor,
            "fraction_of_floor": rate / floor,
            "step_ms": 1e3 / rate,
            "floor_step_ms": 1e3 / floor,
        })
        graphs = runner.decode_graphs
        if graphs is not None:  # split the step: the replayed graph (forward, LM head, argmax;
            # its buffers hold the last step's inputs) and the rest (host work: scheduling, inputs,
            # the token's copy back, output processing) not hidden behind it
            graph_ms = time_cuda_ms(graphs.graphs[1].replay)
            rows[-1]["graph_ms"] = graph_ms
            rows[-1]["rest_of_step_ms"] = rows[-1]["step_ms"] - graph_ms
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, weights {weight_bytes / 1e9:.2f} GB, "
          f"KV {kv_bytes_per_ctx / 1e3:.1f} kB per context token")
    print_table("batch-1 decode", rows)
    write_json(args.json, {"latency": rows, "bandwidth_bytes_per_s": bandwidth,
                           "weight_bytes": weight_bytes, "args": vars(args)})


if __name__ == "__main__":
    main()
