"""The same greedy tokens as transformers on the 16 real prompts when the engine is squeezed:
chunked prefill at a 32-token budget, a KV cache small enough to preempt, and prefix caching
(every prompt run twice; the second pass hits the cache)."""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from tests.smollm2.conftest import MAX_TOKENS

BLOCK_BYTES = 16 * 30 * 2 * 3 * 64 * 4  # a block of 16 tokens: 30 layers, K and V, 3 KV heads of 64, fp32


@pytest.fixture(scope="module")
def llm(smollm2_file: str, smollm2_cache: str) -> LLM:
    return LLM(model=smollm2_file, dtype="float32", max_model_len=512, max_num_batched_tokens=32,
               kv_cache_memory_bytes=40 * BLOCK_BYTES, enable_prefix_caching=True, max_num_seqs=16)


def test_greedy_under_chunked_prefill_preemption_and_prefix_caching(
        llm: LLM, prompt_ids: list[list[int]], hf_greedy_outputs: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for round_ in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        for i, (out, expected) in enumerate(zip(outs, hf_greedy_outputs)):
            assert list(out.outputs[0].token_ids) == expected, f"round {round_}, prompt {i}"
    stats = llm.llm_engine.get_stats().last
    assert stats is not None
    assert stats.num_preemptions > 0  # the cache was too small for the batch
    assert stats.prefix_cache_hits > 0  # the second round found the first round's blocks
