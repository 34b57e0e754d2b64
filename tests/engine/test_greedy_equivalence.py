"""pagedserve's greedy tokens equal Hugging Face `generate`, token for token, for every supported
architecture, and keep doing so under preemption (recompute and swap), chunked prefill, prefix
caching and n > 1 parallel sampling."""

from __future__ import annotations

import pytest

from pagedserve.testing.checkpoints import ARCHS
from tests.engine.engine_helpers import MAX_TOKENS, greedy, make_engine, run_staggered


def assert_matches(finished: dict, expected: list[list[int]]) -> None:
    assert len(finished) == len(expected)
    for i, ref in enumerate(expected):
        got = list(finished[str(i)].outputs[0].token_ids)
        assert got == ref, f"prompt {i}: {got} != {ref}"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(arch, tiny_checkpoints, greedy_reference) -> None:
    prompts, expected = greedy_reference(arch)
    engine = make_engine(tiny_checkpoints[arch])
    assert_matches(run_staggered(engine, prompts, greedy()), expected)
    assert engine.engine_core.scheduler.kv.pool.num_free_blocks == engine.config.cache_config.num_gpu_blocks


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_greedy_matches_hf_under_preemption(arch, mode, tiny_checkpoints, greedy_reference) -> None:
    prompts, expected = greedy_reference(arch)
    # 24 blocks of 16 = 384 slots for ~2000 tokens of prompts, admitted in 64-token chunks that
    # then grow: running requests run out of blocks and must be preempted.
    engine = make_engine(tiny_checkpoints[arch], num_gpu_blocks_override=24, max_model_len=320,
                         max_num_batched_tokens=64, preemption_mode=mode, enable_prefix_caching=False)
    assert_matches(run_staggered(engine, prompts, greedy(), per_step=16), expected)
    stats = engine.get_stats()
    assert stats.last is not None and stats.last.num_preemptions > 0
    scheduler = engine.engine_core.scheduler
    assert (scheduler.num_swap_outs > 0) == (mode == "swap")
    kv = scheduler.kv
    assert kv.pool.num_free_blocks == 24
    assert kv.swap_space.num_free_blocks == kv.swap_space.num_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_matches_hf_with_chunked_prefill_budget_32(arch, tiny_checkpoints, greedy_reference) -> None:
    prompts, expected = greedy_reference(arch)
    # each step's stats read right after its step(): the synchronous loop (async updates a step late)
    engine = make_engine(tiny_checkpoints[arch], max_num_batched_tokens=32, async_scheduling=False)
    scheduled = []
    finished = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), {"prompt_token_ids": prompt}, greedy())
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        scheduled.append(engine.get_stats().last.num_scheduled_tokens)
    assert max(scheduled) <= 32
    assert_matches(finished, expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_hf_with_prefix_caching(arch, tiny_checkpoints, hf_reference) -> None:
    from tests.engine.engine_helpers import hf_greedy, make_prompts

    model, _ = hf_reference(arch)
    [shared] = make_prompts(model.config.vocab_size, seed=7, lengths=(150,))
    tails = make_prompts(model.config.vocab_size, seed=8, lengths=(1, 5, 16, 30, 47, 60))
    prompts = [shared + t for t in tails] + [shared[:100], shared]
    expected = [hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    engine = make_engine(tiny_checkpoints[arch], enable_prefix_caching=True)
    assert_matches(run_staggered(engine, prompts, greedy(), per_step=1), expected)
    last = engine.get_stats().last
    assert last is not None and last.prefix_cache_hits > 0
    assert engine.get_stats().prefix_cache_hit_rate > 0.5


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_n3_greedy_children_share_the_prompt(arch, tiny_checkpoints, greedy_reference) -> None:
    prompts, expected = greedy_reference(arch)
    engine = make_engine(tiny_checkpoints[arch], enable_prefix_caching=False)
    picks = [0, 5, 8, 15]  # 1, 17, 100 and 300 tokens
    finished = run_staggered(engine, [prompts[i] for i in picks], greedy(n=3), per_step=2)
    for j, i in enumerate(picks):
        outs = finished[str(j)].outputs
        assert [o.index for o in outs] == [0, 1, 2]
        for o in outs:
            assert list(o.token_ids) == expected[i]
    # The prompt is computed once: (P - 1) shared tokens, then per child the last prompt token
    # and MAX_TOKENS - 1 decode steps (a one-token prompt has nothing to share).
    computed = sum(len(prompts[i]) - 1 + 3 * MAX_TOKENS if len(prompts[i]) > 1 else 3 * MAX_TOKENS
                   for i in picks)
    assert engine.get_stats().num_scheduled_tokens == computed
