"""Tensor parallelism on the CPU (gloo, one worker process per rank): the greedy tokens of
tensor_parallel_size 2 and 4 equal Hugging Face's (and so tp=1's, tests/engine/test_greedy_equivalence.py)
for every architecture, with chunked prefill and preemption on, including KV heads fewer than
the ranks (replicated), tied embeddings and a vocabulary that does not divide over the ranks."""

from __future__ import annotations

from typing import Any

import pytest

from pagedserve.executor.multiproc import MultiprocExecutor
from pagedserve.testing.checkpoints import build_checkpoint
from tests.engine.engine_helpers import (
    MAX_TOKENS,
    greedy,
    hf_greedy,
    make_engine,
    make_prompts,
    run_staggered,
)


def _assert_matches(finished: dict[str, Any], expected: list[list[int]]) -> None:
    assert len(finished) == len(expected)
    for i, ref in enumerate(expected):
        got = list(finished[str(i)].outputs[0].token_ids)
        assert got == ref, f"prompt {i}: {got} != {ref}"


# qwen3: tied embeddings; mistral and qwen2: sliding windows (replicated KV heads: the tp=4 test).
# 24 blocks of 16 for ~2000 prompt tokens in 64-token chunks: preemption.
@pytest.mark.parametrize(("arch", "mode"), [
    ("llama", "recompute"), ("mistral", "swap"), ("qwen2", "recompute"), ("qwen3", "swap"),
])  # fmt: skip
def test_tp2_greedy_matches_hf(arch, mode, tiny_checkpoints, greedy_reference) -> None:
    prompts, expected = greedy_reference(arch)
    engine = make_engine(tiny_checkpoints[arch], tensor_parallel_size=2, num_gpu_blocks_override=24,
                         max_model_len=320, max_num_batched_tokens=64, preemption_mode=mode,
                         enable_prefix_caching=False)  # fmt: skip
    try:
        executor = engine.engine_core.executor
        assert isinstance(executor, MultiprocExecutor) and executor.world_size == 2
        finished = run_staggered(engine, prompts, greedy(), per_step=16)
        stats = engine.get_stats().last
        assert stats is not None and stats.num_preemptions > 0
        assert (engine.engine_core.scheduler.num_swap_outs > 0) == (mode == "swap")
    finally:
        engine.shutdown()
    _assert_matches(finished, expected)


def test_tp4_replicated_kv_heads_tied_odd_vocab(tmp_path_factory) -> None:
    """4 ranks over 4 query heads and 2 KV heads (each KV head on two ranks), tied embeddings and
    515 vocabulary rows (padded to 516 over 4 ranks): HF's tokens, and tp=1's."""
    import torch
    from transformers import AutoModelForCausalLM

    path = build_checkpoint(str(tmp_path_factory.mktemp("tp4") / "llama"), "llama", vocab_size=515,
                            tie_word_embeddings=True)  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.config.vocab_size % 4 and hf.config.num_key_value_heads < 4
    prompts = make_prompts(515, seed=5, lengths=(1, 16, 33, 90, 150))
    prompts.append([514, 513, 512, 11])  # the last vocabulary rows: on the last rank's shard
    expected = [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    tp1 = run_staggered(make_engine(path, max_model_len=256), prompts, greedy(), per_step=2)
    _assert_matches(tp1, expected)
    engine = make_engine(path, tensor_parallel_size=4, max_model_len=256, max_num_batched_tokens=48,
                         num_gpu_blocks_override=20)  # fmt: skip
    try:
        finished = run_staggered(engine, prompts, greedy(), per_step=2)
    finally:
        engine.shutdown()
    _assert_matches(finished, expected)


def test_tp2_async_random_sampling_agrees_across_ranks_and_with_tp1(tiny_checkpoints) -> None:
    """Async scheduling (the default) draws random and seeded tokens on the device; at tp=2 rank
    0's draw reaches the other rank through the all-reduce (RankZeroSampler.draw), so the ranks
    keep one sequence: the tokens equal tp=1's, the unseeded ones too (rank 0's generator starts
    as tp=1's and draws in the same order)."""
    from tests.engine.test_async_scheduling import _random_params

    prompts = make_prompts(512, seed=29, lengths=(3, 9, 17, 40, 64, 5, 33, 2, 12, 27))
    results = []
    for tp in (1, 2):
        engine = make_engine(tiny_checkpoints["llama"], tensor_parallel_size=tp, max_num_batched_tokens=48)
        try:
            assert engine.engine_core.async_scheduling
            finished = run_staggered(engine, prompts, _random_params, per_step=3)
        finally:
            engine.shutdown()
        results.append({k: list(v.outputs[0].token_ids) for k, v in finished.items()})
    assert results[0] == results[1]
