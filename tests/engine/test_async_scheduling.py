"""Async scheduling (EngineArgs.async_scheduling): step n+1 is planned and launched before step n's
tokens are known. On the CPU the eager path takes the argmax and step n+1 reads step n's token
from the sampled-ids tensor, as the GPU does, so the whole protocol runs here: greedy tokens equal
Hugging Face under preemption, chunked prefill, prefix caching and n > 1; stop conditions and
aborts cut requests exactly as in synchronous mode; batches that mix plain greedy requests with
ones that sample on the host (logprobs, seeds, penalties) give the same tokens as synchronous mode.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.testing.checkpoints import ARCHS
from tests.engine.engine_helpers import (
    MAX_TOKENS,
    greedy,
    hf_greedy,
    make_engine,
    make_prompts,
    run_staggered,
)
from tests.engine.test_greedy_equivalence import assert_matches


def _assert_idle(engine) -> None:
    core = engine.engine_core
    assert not engine.has_unfinished_requests() and not core.has_unfinished_requests()
    kv = core.scheduler.kv
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    assert kv.swap_space.num_free_blocks == kv.swap_space.num_blocks
    assert not core.scheduler._planned  # every planned step was updated


@pytest.mark.parametrize("arch", ARCHS)
def test_async_greedy_matches_hf(arch, tiny_checkpoints, greedy_reference) -> None:
    prompts, expected = greedy_reference(arch)
    engine = make_engine(tiny_checkpoints[arch], async_scheduling=True)
    assert_matches(run_staggered(engine, prompts, greedy()), expected)
    _assert_idle(engine)
    # the decode steps really overlapped: most steps were launched before the last one's update
    runner = engine.engine_core.runner
    assert runner._num_async_steps > 10 and runner._num_filled_steps > 10


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_async_greedy_matches_hf_under_preemption(mode, tiny_checkpoints, greedy_reference) -> None:
    prompts, expected = greedy_reference("llama")
    engine = make_engine(tiny_checkpoints["llama"], num_gpu_blocks_override=24, max_model_len=320,
                         max_num_batched_tokens=64, preemption_mode=mode, enable_prefix_caching=False,
                         async_scheduling=True)
    assert_matches(run_staggered(engine, prompts, greedy(), per_step=16), expected)
    scheduler = engine.engine_core.scheduler
    assert scheduler.num_preemptions > 0
    assert (scheduler.num_swap_outs > 0) == (mode == "swap")
    _assert_idle(engine)


def test_async_chunked_prefill_and_prefix_caching(tiny_checkpoints, hf_reference) -> None:
    model, _ = hf_reference("llama")
    [shared] = make_prompts(model.config.vocab_size, seed=7, lengths=(150,))
    tails = make_prompts(model.config.vocab_size, seed=8, lengths=(1, 5, 16, 30, 47, 60))
    prompts = [shared + t for t in tails] + [shared[:100], shared]
    expected = [hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    engine = make_engine(tiny_checkpoints["llama"], enable_prefix_caching=True,
                         max_num_batched_tokens=32, async_scheduling=True)
    assert_matches(run_staggered(engine, prompts, greedy(), per_step=1), expected)
    assert engine.get_stats().prefix_cache_hit_rate > 0.5
    assert max(1, engine.get_stats().last.num_scheduled_tokens) <= 32
    _assert_idle(engine)


def test_async_n3_children(tiny_checkpoints, greedy_reference) -> None:
    prompts, expected = greedy_reference("llama")
    engine = make_engine(tiny_checkpoints["llama"], enable_prefix_caching=False, async_scheduling=True)
    picks = [0, 5, 8, 15]
    finished = run_staggered(engine, [prompts[i] for i in picks], greedy(n=3), per_step=2)
    for j, i in enumerate(picks):
        assert [list(o.token_ids) for o in finished[str(j)].outputs] == [expected[i]] * 3
    _assert_idle(engine)


def _mixed_params(i: int) -> SamplingParams:
    """Plain greedy, greedy with logprobs, seeded random, penalties, max_tokens 1 or prompt
    logprobs, in turn."""
    kind = i % 5
    if kind == 0:
        return greedy(max_tokens=7 + i)
    if kind == 1:
        return greedy(max_tokens=6, logprobs=2)
    if kind == 2:
        return SamplingParams(temperature=0.9, seed=100 + i, max_tokens=9, ignore_eos=True)
    if kind == 3:
        return SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, repetition_penalty=1.3)
    if i % 10 == 4:
        return greedy(max_tokens=1)
    return SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, prompt_logprobs=2)


@pytest.mark.parametrize("per_step", [1, 16])
def test_async_mixed_batches_equal_sync(per_step, tiny_checkpoints) -> None:
    prompts = make_prompts(512, seed=21, lengths=(3, 9, 17, 40, 64, 5, 33, 80, 2, 20, 50, 16))
    results = []
    for async_scheduling in (False, True):
        engine = make_engine(tiny_checkpoints["llama"], max_num_batched_tokens=48,
                             async_scheduling=async_scheduling)
        finished = run_staggered(engine, prompts, _mixed_params, per_step=per_step)
        results.append({
            k: [(list(o.token_ids), o.finish_reason,
                 [sorted(lp) for lp in o.logprobs] if o.logprobs else None,
                 [sorted(lp) if lp else None for lp in v.prompt_logprobs] if v.prompt_logprobs else None)
                for o in v.outputs]
            for k, v in finished.items()
        })
        _assert_idle(engine)
    assert results[0] == results[1]


@pytest.fixture(scope="module")
def async_llm(tiny_checkpoints) -> LLM:
    return LLM(tiny_checkpoints["llama"], dtype="float32", max_model_len=512,
               kv_cache_memory_bytes=16 << 20, async_scheduling=True)


def test_async_stop_conditions(async_llm: LLM) -> None:
    eos = async_llm.get_tokenizer().eos_token_id
    prompt = {"prompt_token_ids": make_prompts(512, seed=12, lengths=(10,))[0]}
    base = async_llm.generate(prompt, greedy(max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert len(base.token_ids) == 12 and base.finish_reason == "length"
    # a stop token id: the step already planned past it gives a token that is dropped
    stop_id = base.token_ids[4]
    first = list(base.token_ids).index(stop_id)
    out = async_llm.generate(prompt, greedy(max_tokens=12, stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == list(base.token_ids[: first + 1])
    assert out.outputs[0].stop_reason == stop_id
    # stop strings (finished by the output processor, which aborts the request in the core)
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if stop.strip():
        cut = async_llm.generate(prompt, greedy(max_tokens=12, stop=[stop]), use_tqdm=False)[0].outputs[0]
        assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    # EOS forced by logit_bias (a host-sampled request), and max_tokens 1 and 2
    out = async_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100.0}),
                             use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == [eos] and out.finish_reason == "stop"
    for n in (1, 2):
        out = async_llm.generate(prompt, greedy(max_tokens=n), use_tqdm=False)[0].outputs[0]
        assert list(out.token_ids) == list(base.token_ids[:n])
    _assert_idle(async_llm.llm_engine)


def test_async_abort_mid_flight(tiny_checkpoints, greedy_reference) -> None:
    prompts, expected = greedy_reference("llama")
    engine = make_engine(tiny_checkpoints["llama"], async_scheduling=True)
    for i in (3, 6, 9):
        engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, greedy())
    finished = {}
    for step in range(40):
        if engine.engine_core.step_in_flight and step in (3, 5):
            engine.abort_request(str(3 if step == 3 else 9))  # while its next step is launched
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert set(finished) == {"6"}
    assert list(finished["6"].outputs[0].token_ids) == expected[6]
    engine.step()  # tell the runner about the last finished requests
    _assert_idle(engine)
    assert not engine.engine_core.runner.states


def _random_params(i: int) -> SamplingParams:
    """Sampling that async scheduling draws on the device: seeded temperature with top-k / top-p /
    min-p, a logit bias, min_tokens, unseeded draws, and penalties (device token counts), in turn."""
    kind = i % 5
    if kind == 4:
        return SamplingParams(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1, presence_penalty=0.3,
                              frequency_penalty=0.2, seed=300 + i, max_tokens=14, ignore_eos=True)  # fmt: skip
    if kind == 0:
        return SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7 + i, max_tokens=12, ignore_eos=True)
    if kind == 1:
        return SamplingParams(temperature=1.1, min_p=0.05, seed=50 + i, max_tokens=9,
                              logit_bias={5: 3.0, 9: -2.0})  # fmt: skip
    if kind == 2:
        return SamplingParams(temperature=0.7, seed=90 + i, max_tokens=10, min_tokens=4)
    return SamplingParams(temperature=0.9, top_k=5, max_tokens=8, ignore_eos=True)  # unseeded


@pytest.mark.parametrize("per_step", [1, 16])
def test_async_random_sampling_is_drawn_on_the_device_and_equals_sync(per_step, tiny_checkpoints) -> None:
    """Seeded random sampling launches without waiting for the ids (the runner counts steps whose
    inputs took the previous step's draw on the device), and gives the tokens synchronous mode gives: a draw's seed counts the tokens still in
    flight; penalised rows' counts are recorded on the device. The unseeded rows draw from the
    global generator in the same launch order."""
    prompts = make_prompts(512, seed=23, lengths=(3, 9, 17, 40, 64, 5, 33, 80, 2, 20, 50, 16))
    results = []
    for async_scheduling in (False, True):
        engine = make_engine(tiny_checkpoints["llama"], max_num_batched_tokens=48,
                             async_scheduling=async_scheduling)
        torch.manual_seed(1234)  # the unseeded rows' generator, the same start in both modes
        finished = run_staggered(engine, prompts, _random_params, per_step=per_step)
        results.append({k: [(list(o.token_ids), o.finish_reason) for o in v.outputs] for k, v in finished.items()})
        runner = engine.engine_core.executor.runner
        assert runner._num_async_steps > 0  # drawn on the device, ids read back at collect
        # async: steps launched before the last one's ids reached the host, which they read
        # on the device
        assert (runner._num_filled_steps > 0) == async_scheduling
        _assert_idle(engine)
    assert results[0] == results[1]
