"""CPU: teacher-forced top-1 agreement of pagedserve bf16 (torch kernels) with transformers bf16 and
float32 on SmolLM2-135M-Instruct (its GGUF), each top-1 the lowest id among tied maxima.

    python benchmarks/results/cpu-2026-12-01-bf16-ties/teacher_forced_cpu.py GGUF
"""

from __future__ import annotations

import copy
import sys

import torch

from benchmarks.smollm2_gpu import agreement, hf_model, hf_top, our_top
from pagedserve import LLM
from pagedserve.model_executor.gguf_loader import load_gguf_tokenizer
from pagedserve.testing.real_text import TECHNICAL_TEXT


def main(gguf: str) -> None:
    tok = load_gguf_tokenizer(gguf)
    paragraphs = [p for p in TECHNICAL_TEXT.split("\n\n") if p.strip()]
    seqs = [tok(t, add_special_tokens=False).input_ids for t in [TECHNICAL_TEXT, *paragraphs]]
    hf32 = hf_model(gguf, torch.float32, "cpu")
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    top32: list[int] = []
    lead32: list[float] = []
    top16: list[int] = []
    for s in seqs:
        top, lead, _ = hf_top(hf32, s)
        top32 += top
        lead32 += lead
        top16 += hf_top(hf16, s)[0]
    llm = LLM(model=gguf, dtype="bfloat16", max_model_len=4096, device="cpu")
    ours = [t for s in seqs for t in our_top(llm, s)]
    confident = [lead >= 0.5 for lead in lead32]
    print(f"positions {len(top32)}: pagedserve bf16 vs transformers bf16 {agreement(ours, top16):.4f}, "
          f"vs transformers float32 {agreement(ours, top32):.4f}; transformers bf16 vs float32 "
          f"{agreement(top16, top32):.4f}; lead >= 0.5: ours {agreement(ours, top32, confident):.4f}, "
          f"transformers bf16 {agreement(top16, top32, confident):.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
