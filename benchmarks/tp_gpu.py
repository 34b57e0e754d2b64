"""Tensor parallelism on several GPUs, measured (issue 18): NCCL all-reduce, tp=2 vs tp=1
agreement on the 8B bf16 model, batch-1 decode beside its floor, offline throughput and start-up;
with --model70b-dummy a Llama-3-70B-shaped random model at tp=4.

    python -m benchmarks.tp_gpu --model /tmp/llama3-8b-random --tp 1 2 --json OUT.json \
        [--parts nccl agree decode throughput] [--model70b-dummy]
    python -m benchmarks.tp_gpu --tp --parts decode throughput --model70b-dummy   # the 70B part alone
    python -m benchmarks.tp_gpu --tiny --json OUT.json     # CPU, gloo, a tiny model: minutes

Parts (each engine started alone and freed, worker processes checked gone, before the next):
  nccl        all-reduce latency / bus bandwidth at every tp > 1 of the run (benchmarks/nccl_bench.py)
              for the batch-1 message (1 x hidden) and the mixed-step one (token budget x hidden)
  agree       teacher-forced top-1 of our bf16 engine at each tp against tp=1, on the positions
              where HF float32's top-1 leads by >= 0.25 logit (benchmarks/gpu_checks.py's measure:
              random weights give nearly flat logits, which bf16 rounding alone flips); target 99.5%
  decode      batch-1 decode at context 128 and 2048; floor step = (weight bytes + KV bytes read,
              per GPU) / copy bandwidth + (2 per layer + 1 for the embedding) all-reduces x the
              measured batch-1 all-reduce latency (the LM head's all-gather is left out: a floor)
  throughput  the 1000-request ShareGPT-like mix (ignore_eos) on the same engine; start-up time
  70b         (--model70b-dummy, 4 GPUs) config-only Llama-3-70B shape, load_format="dummy", tp=4:
              start-up, decode beside its floor, throughput on the mix

Every process runs with NVLink multicast off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): set below before torch is imported; the engine's workers get the same
(communicator.worker_environment) and inherit this environment.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import tempfile
import time
from typing import Any

from benchmarks.nccl_bench import measure_all_reduce, set_no_multicast_env

set_no_multicast_env()

import torch  # noqa: E402

from benchmarks.common import measure_copy_bandwidth, print_table, write_json  # noqa: E402
from benchmarks.gpu_checks import _agree  # noqa: E402
from benchmarks.latency import decode_rate  # noqa: E402
from benchmarks.throughput import measure as measure_throughput  # noqa: E402
from benchmarks.workload import named_workload  # noqa: E402

LLAMA3_70B: dict[str, Any] = dict(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)
MARGIN = 0.25


def per_gpu_bytes(spec: Any, tp: int, element: int) -> tuple[int, int]:
    """(weight bytes one decode step reads on one rank, KV bytes per context token on one rank)
    of a dense Llama-family model split over tp ranks: q / o / MLP / LM head split, KV heads split
    (replicated when fewer than the ranks), norms replicated; the embedding table left out (one
    row is gathered) unless tied to the LM head."""
    assert spec.num_experts == 0, "dense models only"
    h, d = spec.hidden_size, spec.head_dim
    kv = max(1, spec.num_kv_heads // tp)
    q = spec.num_heads // tp * d
    layer = h * (q + 2 * kv * d) + q * h + 3 * h * math.ceil(spec.intermediate_size / tp) + 2 * h
    weights = spec.num_layers * layer + h + math.ceil(spec.vocab_size / tp) * h
    return weights * element, 2 * spec.num_layers * kv * d * element


def _free(llm: Any, device: str) -> None:
    """Shut the engine down, check its worker processes are gone, release its memory."""
    executor = llm.llm_engine.engine_core.executor
    llm.llm_engine.shutdown()
    alive = [p.pid for p in getattr(executor, "_procs", []) if p.poll() is None]
    assert not alive, f"tensor-parallel workers still running: {alive}"
    del llm, executor
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _start(model: str, tp: int, device: str, **kwargs: Any) -> tuple[Any, float]:
    from pagedserve import LLM

    started = time.perf_counter()
    llm = LLM(model, tensor_parallel_size=tp, device=device, **kwargs)
    return llm, time.perf_counter() - started


# ---------------------------------------------------------------- part 1: all-reduce


def all_reduce_rows(tps: list[int], hidden: int, budget: int, cpu: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for tp in sorted({t for t in tps if t > 1}):
        rows += measure_all_reduce(tp, hidden, [1, budget], repeats=20 if cpu else 200, cpu=cpu)
    return rows


def _latency_s(ar: list[dict[str, Any]], tp: int, hidden: int) -> float:
    if tp == 1:
        return 0.0
    row = next((r for r in ar if r["world_size"] == tp and r["hidden"] == hidden and r["tokens"] == 1), None)
    assert row is not None, f"no batch-1 all-reduce measured at {tp} ranks, hidden {hidden}"
    return row["latency_us"] / 1e6


# ---------------------------------------------------------------- part 2: agreement


def _hf_fp32(model_dir: str, seqs: list[list[int]], device: str) -> tuple[list[Any], list[Any]]:
    """HF float32's teacher-forced top-1 at every position and its top-1/top-2 margin."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()  # type: ignore[arg-type]
    top1, margin = [], []
    with torch.no_grad():
        for s in seqs:
            logits = hf(torch.tensor([s], device=device)).logits[0, :-1].float()
            top2 = logits.topk(2, dim=-1).values
            top1.append(logits.argmax(-1).tolist())
            margin.append((top2[:, 0] - top2[:, 1]).tolist())
    del hf
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return top1, margin


def _our_top1(model_dir: str, tp: int, dtype: str, seqs: list[list[int]], device: str) -> list[Any]:
    from pagedserve import SamplingParams

    llm, _ = _start(model_dir, tp, device, dtype=dtype, max_model_len=max(map(len, seqs)) + 16,
                    gpu_memory_utilization=0.6)
    outs = llm.generate([{"prompt_token_ids": s} for s in seqs],
                        SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    top1 = [[next(t for t, lp in out.prompt_logprobs[pos].items() if lp.rank == 1)
             for pos in range(1, len(s))] for out, s in zip(outs, seqs)]
    _free(llm, device)
    return top1


def agreement(model_dir: str, tps: list[int], device: str, dtype: str, num_seqs: int, seq_len: int,
              vocab: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(100, vocab - 100, (seq_len,), generator=gen).tolist() for _ in range(num_seqs)]
    hf, margin = _hf_fp32(model_dir, seqs, device)
    keep = [[m >= MARGIN for m in row] for row in margin]
    ours = {tp: _our_top1(model_dir, tp, dtype, seqs, device) for tp in sorted(set(tps) | {1})}
    confident = sum(map(sum, keep))
    return [{"tp": tp, "dtype": dtype, "positions": num_seqs * (seq_len - 1), "confident_positions": confident,
             "vs_tp1_confident": _agree(top1, ours[1], keep), "vs_tp1_all": _agree(top1, ours[1]),
             "vs_hf_fp32_confident": _agree(top1, hf, keep), "target": 0.995,
             "meets_target": _agree(top1, ours[1], keep) >= 0.995}
            for tp, top1 in ours.items()]


# ---------------------------------------------------------------- parts 3-5: decode, throughput


def speed(model_dir: str, tp: int, device: str, dtype: str, args: argparse.Namespace, bandwidth: float,
          ar: list[dict[str, Any]], **engine_kwargs: Any) -> dict[str, Any]:
    """Start-up, batch-1 decode at each context beside its floor, then (unless --parts leaves it
    out) throughput on the mix, all on one engine."""
    llm, startup = _start(model_dir, tp, device, dtype=dtype, max_model_len=args.max_model_len, **engine_kwargs)
    engine = llm.llm_engine
    core = engine.engine_core
    spec = engine.model_config.model_spec
    element = getattr(torch, dtype).itemsize
    weights, kv_per_token = per_gpu_bytes(spec, tp, element)
    result: dict[str, Any] = {"tp": tp, "startup_s": startup, "weight_bytes_per_gpu": weights,
                              "kv_bytes_per_token_per_gpu": kv_per_token,
                              "model_load_s": core.stats.extra.get("model_load_seconds"),
                              "graph_capture_s": core.stats.extra.get("cuda_graph_capture_seconds")}
    if tp == 1 and hasattr(core.executor, "runner"):  # the count above, checked on the real model
        runner = core.runner
        result["weight_bytes_counted"] = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters()
                                             if "embed_tokens" not in n or spec.tie_word_embeddings)
    rows = []
    if "decode" in args.parts:
        collectives_s = (2 * spec.num_layers + 1) * _latency_s(ar, tp, spec.hidden_size)
        decode_rate(engine, 64, 16, core.vocab_size)  # warm-up: kernel compilation
        for context in args.contexts:
            rate = decode_rate(engine, context, args.num_tokens, core.vocab_size)
            mean_ctx = context + args.num_tokens / 2
            floor_s = (weights + kv_per_token * mean_ctx) / bandwidth + collectives_s
            rows.append({"tp": tp, "context": context, "tokens_per_s": rate, "step_ms": 1e3 / rate,
                         "floor_step_ms": floor_s * 1e3, "all_reduce_ms": collectives_s * 1e3,
                         "fraction_of_floor": floor_s * rate})
    result["decode"] = rows
    if "throughput" in args.parts:
        named = named_workload("sharegpt", core.vocab_size, args.num_requests, args.scale,
                               max_model_len=args.max_model_len)
        result["throughput"] = {"tp": tp, **measure_throughput(llm, args.num_requests, named)}
    _free(llm, device)
    return result


def write_70b_config(out_dir: str) -> str:
    from transformers import LlamaConfig

    from pagedserve.testing.checkpoints import build_tokenizer

    if not os.path.exists(os.path.join(out_dir, "config.json")):
        os.makedirs(out_dir, exist_ok=True)
        build_tokenizer(out_dir, vocab_size=512, model_max_length=8192)
        config = LlamaConfig(**LLAMA3_70B)
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(out_dir)
    return out_dir


def config_only_copy(model_dir: str, out_dir: str) -> str:
    """`model_dir` without its weights (config, tokenizer): a load_format="dummy" directory."""
    for name in os.listdir(model_dir):
        if not name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy(os.path.join(model_dir, name), out_dir)
    return out_dir


def _print_speed(title: str, results: list[dict[str, Any]]) -> None:
    print_table(f"{title}: start-up", [{k: r[k] for k in ("tp", "startup_s", "model_load_s", "graph_capture_s",
                                                           "weight_bytes_per_gpu")} for r in results])
    print_table(f"{title}: batch-1 decode beside its floor", [row for r in results for row in r["decode"]])
    keys = ("tp", "requests", "elapsed_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
            "kv_capacity_tokens", "preemptions")
    print_table(f"{title}: offline throughput (ShareGPT-like mix, ignore_eos)",
                [{k: r["throughput"][k] for k in keys} for r in results if "throughput" in r])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/llama3-8b-random")
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2],
                        help="tp sizes of the 8B parts; none (a bare --tp): only the 70B part")
    parser.add_argument("--parts", nargs="+", default=["nccl", "agree", "decode", "throughput"],
                        choices=["nccl", "agree", "decode", "throughput"])
    parser.add_argument("--model70b-dummy", action="store_true", help="also the 70B shape at tp=4 (4 GPUs)")
    parser.add_argument("--model70b-dir", default="/tmp/llama3-70b-config")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 128 2048 (--tiny: 32 128)")
    parser.add_argument("--num-tokens", type=int, default=None, help="decoded per context; default 256 (--tiny: 16)")
    parser.add_argument("--num-requests", type=int, default=None, help="default 1000 (--tiny: 24)")
    parser.add_argument("--budget", type=int, default=16384, help="mixed-step tokens of the all-reduce message")
    parser.add_argument("--tiny", action="store_true", help="CPU, gloo, a tiny llama: parts 2-4 end to end")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        from pagedserve.testing.checkpoints import build_checkpoint

        args.model = build_checkpoint(tempfile.mkdtemp(prefix="tp-tiny-"), "llama")
        args.budget = 256
    args.contexts = args.contexts or ([32, 128] if args.tiny else [128, 2048])
    args.num_tokens = args.num_tokens or (16 if args.tiny else 256)
    args.num_requests = args.num_requests or (24 if args.tiny else 1000)
    args.scale = 0.05 if args.tiny else 1.0
    args.max_model_len = 512 if args.tiny else 4096
    from transformers import AutoConfig

    hf_config: Any = AutoConfig.from_pretrained(args.model) if args.tp or args.tiny else None
    dtype = "float32" if args.tiny else "bfloat16"
    # part 5: --tiny puts the tiny model's config (no weights) at tp=2 over gloo in its place
    tp70, hidden70 = (2, hf_config.hidden_size) if args.tiny else (4, LLAMA3_70B["hidden_size"])
    result: dict[str, Any] = {"args": vars(args)}
    ar: list[dict[str, Any]] = []
    if ("nccl" in args.parts or "decode" in args.parts) and (args.tp or args.model70b_dummy):
        if args.tp:
            ar = all_reduce_rows(args.tp, hf_config.hidden_size, args.budget, cpu=args.tiny)
        if args.model70b_dummy and not any(r["world_size"] == tp70 and r["hidden"] == hidden70 for r in ar):
            ar += measure_all_reduce(tp70, hidden70, [1, args.budget], repeats=20 if args.tiny else 200,
                                     cpu=args.tiny)
        print_table("all-reduce (median; slowest rank)", ar)
        result["all_reduce"] = ar
    if "agree" in args.parts and args.tp:
        rows = agreement(args.model, args.tp, device, "bfloat16", 4 if args.tiny else 8,
                         64 if args.tiny else 512, hf_config.vocab_size)
        print_table(f"teacher-forced top-1 vs tp=1 (bf16; confident: HF fp32 margin >= {MARGIN})", rows)
        result["agreement"] = rows
    bandwidth = measure_copy_bandwidth(64 << 20, repeats=10, device="cpu") if args.tiny else measure_copy_bandwidth()
    result["bandwidth_bytes_per_s"] = bandwidth
    print(f"\ncopy bandwidth {bandwidth / 1e12:.3f} TB/s")
    if {"decode", "throughput"} & set(args.parts) and args.tp:
        result["speed"] = [speed(args.model, tp, device, dtype, args, bandwidth, ar) for tp in args.tp]
        _print_speed("8B-shaped" if not args.tiny else "tiny", result["speed"])
    if args.model70b_dummy:
        if args.tiny:
            model70 = config_only_copy(args.model, tempfile.mkdtemp(prefix="tp-tiny-dummy-"))
        else:
            assert torch.cuda.device_count() >= 4, "--model70b-dummy needs 4 GPUs"
            model70 = write_70b_config(args.model70b_dir)
        result["model70b"] = speed(model70, tp70, device, dtype, args, bandwidth, ar, load_format="dummy")
        _print_speed("Llama-3-70B-shaped (dummy weights)" if not args.tiny else "tiny config-only (dummy weights)",
                     [result["model70b"]])
    write_json(args.json, result)


if __name__ == "__main__":
    main()
