"""Shared pieces of the engine tests: a fixed prompt set, HF greedy references, engine runs."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from pagedserve import EngineArgs, LLMEngine, SamplingParams

# 16 prompts, 1 to 300 tokens, crossing block boundaries (block size 16) on purpose.
PROMPT_LENGTHS = (1, 2, 7, 15, 16, 17, 33, 64, 100, 128, 150, 200, 255, 256, 290, 300)
MAX_TOKENS = 10


def make_prompts(vocab_size: int, seed: int = 0, lengths: tuple[int, ...] = PROMPT_LENGTHS) -> list[list[int]]:
    rng = random.Random(seed)
    # token ids >= 10 avoid the special tokens (<s>, </s>, role tokens) of the tiny tokenizer
    return [[rng.randrange(10, vocab_size) for _ in range(n)] for n in lengths]


def hf_greedy(hf_model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )
    return out[0, len(prompt):].tolist()


def make_engine(model_dir: str, **overrides: Any) -> LLMEngine:
    args: dict[str, Any] = dict(
        model=model_dir, dtype="float32", max_model_len=512, kv_cache_memory_bytes=32 << 20,
        swap_space=0.05,
    )
    args.update(overrides)
    return LLMEngine.from_engine_args(EngineArgs(**args))


def run_staggered(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams | Callable[[int], SamplingParams],
    per_step: int = 3,
) -> dict[str, Any]:
    """Add `per_step` prompts before each step (requests join a running batch), run to the end.
    Returns request id -> final RequestOutput. This is vLLM's documented engine loop."""
    pending = list(enumerate(prompts))
    finished: dict[str, Any] = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(min(per_step, len(pending))):
            i, prompt = pending.pop(0)
            p = params(i) if callable(params) else params
            engine.add_request(str(i), {"prompt_token_ids": prompt}, p)
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def greedy(max_tokens: int = MAX_TOKENS, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)
