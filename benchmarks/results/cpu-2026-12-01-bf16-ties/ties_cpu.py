"""CPU: how often transformers' bf16 logits tie exactly at the top, and which id `topk` puts first.

    python benchmarks/results/cpu-2026-12-01-bf16-ties/ties_cpu.py GGUF
"""

from __future__ import annotations

import sys

import torch

from benchmarks.smollm2_gpu import hf_model
from pagedserve.model_executor.gguf_loader import load_gguf_tokenizer
from pagedserve.testing.real_text import TECHNICAL_TEXT


def main(gguf: str) -> None:
    ids = load_gguf_tokenizer(gguf)(TECHNICAL_TEXT, add_special_tokens=False).input_ids
    model = hf_model(gguf, torch.float32, "cpu").to(torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    top2 = logits.topk(2, dim=-1)
    ties = top2.values[:, 0] == top2.values[:, 1]
    lower = torch.minimum(top2.indices[:, 0], top2.indices[:, 1])
    print(f"positions {logits.shape[0]}, exact top-2 ties {int(ties.sum())} ({ties.float().mean():.4f}); "
          f"topk's first differs from argmax at {int((top2.indices[:, 0] != logits.argmax(-1)).sum())}; "
          f"among ties topk puts the lower id first at {(top2.indices[ties, 0] == lower[ties]).float().mean():.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
