"""A Mixtral-8x7B-shaped model with random bf16 weights on one GPU: start-up, batch-1 decode beside
its floor, and offline throughput on the 1000-request ShareGPT-like mix (issue 12).

    python -m benchmarks.moe_gpu --out-dir /tmp/mixtral-8x7b [--json OUT.json]

The checkpoint holds only config.json (Mixtral-8x7B's published shape) and a small tokenizer;
the 46.7 B parameters (93 GB) are drawn on the GPU by load_format="dummy" (normal(0, 0.02),
so the router spreads tokens over the experts as random logits do), which writing and reading
93 GB of safetensors on a 64 GB disk could not.

Floor of a decode step at batch 1: copy bandwidth (measured in the run) over the bytes one token
reads: every non-expert weight (attention, norms, router, LM head; not the embedding table, of
which one row is gathered), top_k / num_experts of the expert weights (the two experts each
layer routes the token to), and the KV cache of the context.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import environment, measure_copy_bandwidth, print_table, time_cuda_ms, write_json
from benchmarks.latency import decode_rate
from benchmarks.throughput import measure as measure_throughput

MIXTRAL_8X7B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
    max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)


def write_config(out_dir: str) -> str:
    from transformers import MixtralConfig

    from pagedserve.testing.checkpoints import build_tokenizer

    if not os.path.exists(os.path.join(out_dir, "config.json")):
        os.makedirs(out_dir, exist_ok=True)
        build_tokenizer(out_dir, vocab_size=512, model_max_length=8192)
        config = MixtralConfig(**MIXTRAL_8X7B)
        config.architectures = ["MixtralForCausalLM"]
        config.save_pretrained(out_dir)
    return out_dir


def decode_bytes(model: torch.nn.Module, top_k: int, num_experts: int) -> tuple[int, int]:
    """(bytes of all weights, bytes one batch-1 decode step reads)."""
    total = active = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        total += size
        if "embed_tokens" in name:
            continue
        active += size * top_k // num_experts if "experts" in name else size
    return total, active


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default="/tmp/mixtral-8x7b")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--num-tokens", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from pagedserve import LLM

    model_dir = write_config(args.out_dir)
    bandwidth = measure_copy_bandwidth()
    started = time.perf_counter()
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", max_model_len=4096, max_num_seqs=256,
              gpu_memory_utilization=0.9)
    startup = time.perf_counter() - started
    engine = llm.llm_engine
    runner = engine.engine_core.runner
    spec = runner.spec
    total, active = decode_bytes(runner.model, MIXTRAL_8X7B["num_experts_per_tok"],
                                 MIXTRAL_8X7B["num_local_experts"])
    element = torch.empty((), dtype=spec.dtype).element_size()
    kv_per_ctx = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element
    decode_rate(engine, 64, 16, runner.vocab_size)  # warm-up: compiles the decode kernels
    rows = []
    for context in args.contexts:
        rate = decode_rate(engine, context, args.num_tokens, runner.vocab_size)
        floor = bandwidth / (active + kv_per_ctx * (context + args.num_tokens / 2))
        row = {"context": context, "tokens_per_s": rate, "floor_tokens_per_s": floor,
               "fraction_of_floor": rate / floor, "step_ms": 1e3 / rate}
        graphs = runner.decode_graphs
        if graphs is not None:
            row["graph_ms"] = time_cuda_ms(graphs.graphs[1].replay)
        rows.append(row)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; weights {total / 1e9:.1f} GB, read per decode "
          f"token {active / 1e9:.2f} GB; start-up {startup:.1f} s")
    print_table("Mixtral-8x7B-shaped batch-1 decode", rows)
    throughput = measure_throughput(llm, args.num_requests)
    print_table("Mixtral-8x7B-shaped offline throughput (ShareGPT-like mix, ignore_eos)", [throughput])
    write_json(args.json, {"environment": environment(), "startup_s": startup,
                           "bandwidth_bytes_per_s": bandwidth, "weight_bytes": total,
                           "decode_bytes_per_token": active, "latency": rows,
                           "throughput": throughput, "args": vars(args)})


if __name__ == "__main__":
    main()
