"""Correctness on the GPU: a tiny float32 model's greedy tokens equal Hugging Face's (Triton
kernels + CUDA graphs path), and the 8B bf16 model agrees with Hugging Face on the
teacher-forced top-1 token.

    python -m benchmarks.gpu_checks --model8b DIR [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import tempfile

import torch

from benchmarks.common import print_table, write_json


def tiny_greedy_check() -> dict:
    from transformers import AutoModelForCausalLM

    from pagedserve import LLM, SamplingParams
    from pagedserve.testing.checkpoints import build_checkpoint

    rows = {}
    for arch in ("llama", "mistral", "qwen3"):
        path = build_checkpoint(tempfile.mkdtemp(prefix=f"tiny-{arch}-"), arch)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, 500, (n,), generator=gen).tolist()
                   for n in (1, 7, 15, 16, 17, 64, 100, 257, 300, 511)]
        refs = []
        for p in prompts:
            with torch.no_grad():
                out = hf.generate(torch.tensor([p]).cuda(), max_new_tokens=16, min_new_tokens=16,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
        del hf
        llm = LLM(path, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        same = sum(list(o.outputs[0].token_ids) == r for o, r in zip(outs, refs))
        rows[arch] = f"{same}/{len(prompts)}"
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def teacher_forced_top1(model_dir: str, num_seqs: int = 8, seq_len: int = 512) -> dict:
    from transformers import AutoModelForCausalLM

    from pagedserve import LLM, SamplingParams

    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(100, 128000, (seq_len,), generator=gen).tolist() for _ in range(num_seqs)]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    hf_top1 = []
    with torch.no_grad():
        for s in seqs:
            hf_top1.append(hf(torch.tensor([s]).cuda()).logits[0, :-1].float().argmax(-1).tolist())
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(model_dir, max_model_len=4096, gpu_memory_utilization=0.8)
    outs = llm.generate([{"prompt_token_ids": s} for s in seqs],
                        SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    agree = total = 0
    for out, ref in zip(outs, hf_top1):
        for pos in range(1, seq_len):
            entry = out.prompt_logprobs[pos]
            top1 = next(t for t, lp in entry.items() if lp.rank == 1)
            agree += int(top1 == ref[pos - 1])
            total += 1
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return {"positions": total, "agree": agree, "agreement": agree / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model8b", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tiny = tiny_greedy_check()
    print_table("tiny float32 models: greedy sequences equal to HF", [tiny])
    result: dict = {"tiny_greedy_equal": tiny}
    if args.model8b:
        top1 = teacher_forced_top1(args.model8b)
        print_table("8B bf16: teacher-forced top-1 agreement with HF", [top1])
        result["teacher_forced_top1"] = top1
    write_json(args.json, result)


if __name__ == "__main__":
    main()
