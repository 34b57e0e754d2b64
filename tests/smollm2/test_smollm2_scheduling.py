"""The same greedy tokens as transformers on the 16 real prompts when the engine is squeezed:
chunked prefill at a 32-token budget with a KV cache of 24 blocks (far fewer than the batch
needs: running requests are preempted and recomputed), then prefix caching (a prompt run again
right after itself finds its blocks)."""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from tests.smollm2.conftest import MAX_TOKENS


@pytest.fixture(scope="module")
def llm(smollm2_file: str, smollm2_cache: str) -> LLM:
    return LLM(model=smollm2_file, dtype="float32", max_model_len=384, max_num_batched_tokens=32,
               num_gpu_blocks_override=24, enable_prefix_caching=True, max_num_seqs=16)


def test_greedy_under_chunked_prefill_preemption_and_prefix_caching(
        llm: LLM, prompt_ids: list[list[int]], hf_greedy_outputs: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    assert max(len(p) for p in prompt_ids) + MAX_TOKENS <= 384
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    for i, (out, expected) in enumerate(zip(outs, hf_greedy_outputs)):
        assert list(out.outputs[0].token_ids) == expected, f"prompt {i}"
    stats = llm.llm_engine.get_stats().last
    assert stats is not None and stats.num_preemptions > 0  # 24 blocks could not hold the batch
    longest = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))[-3:]
    for i in longest:
        for _ in range(2):  # the second run reads the first one's blocks from the prefix cache
            out = llm.generate([{"prompt_token_ids": prompt_ids[i]}], params, use_tqdm=False)[0]
            assert list(out.outputs[0].token_ids) == hf_greedy_outputs[i], f"prompt {i} again"
    stats = llm.llm_engine.get_stats().last
    assert stats is not None and stats.prefix_cache_hits > 0
