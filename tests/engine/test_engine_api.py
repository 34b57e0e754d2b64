"""The vLLM-compatible Python API end to end: LLM.generate/chat, LLMEngine's loop, abort, request
validation, stop conditions that live in the engine, and the engine's metrics."""

from __future__ import annotations

import numpy as np
import pytest

from pagedserve import LLM, SamplingParams
from tests.engine.engine_helpers import greedy, make_engine, make_prompts


@pytest.fixture(scope="module")
def llm(tiny_checkpoints) -> LLM:
    return LLM(tiny_checkpoints["llama"], dtype="float32", max_model_len=512,
               kv_cache_memory_bytes=16 << 20)


def test_generate_text_and_token_prompts_in_order(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    outs = llm.generate(["The cat runs", {"prompt_token_ids": [5, 6, 7]}, "Alice reads"],
                        greedy(max_tokens=4), use_tqdm=False)
    assert [o.prompt for o in outs] == ["The cat runs", None, "Alice reads"]
    assert outs[0].prompt_token_ids == tokenizer.encode("The cat runs")
    assert outs[1].prompt_token_ids == [5, 6, 7]
    for out in outs:
        completion = out.outputs[0]
        assert out.finished and completion.finish_reason == "length"
        assert len(completion.token_ids) == 4
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_chat_applies_the_template(llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    [out] = llm.chat(messages, greedy(max_tokens=3), use_tqdm=False)
    rendered = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=False)
    assert out.prompt == rendered
    assert out.prompt_token_ids == llm.get_tokenizer().encode(rendered, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 3


def test_bad_requests_raise_clear_errors_and_leave_no_trace(llm: LLM) -> None:
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 600}, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate({"prompt_token_ids": [5, 10**6]}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):  # the second prompt is bad: nothing is left half-added
        llm.generate(["fine", {"prompt_token_ids": [10**6]}], use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert not engine.engine_core.has_unfinished_requests()


def test_engine_loop_with_abort_frees_blocks(tiny_checkpoints) -> None:
    engine = make_engine(tiny_checkpoints["llama"])
    prompts = make_prompts(512, seed=11, lengths=(40, 80, 120))
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, greedy(max_tokens=50, n=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r0", "again")
    for _ in range(3):
        engine.step()
    assert engine.get_stats().last.kv_cache_usage > 0
    engine.abort_request(["r1", "r2"])
    assert engine.get_num_unfinished_requests() == 1
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["r0"]
    engine.step()  # let the scheduler tell the worker about the last finished requests
    kv = engine.engine_core.scheduler.kv
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    assert not engine.engine_core.runner.states


def test_stop_conditions(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    eos = tokenizer.eos_token_id
    prompt = {"prompt_token_ids": make_prompts(512, seed=12, lengths=(10,))[0]}
    base = llm.generate(prompt, greedy(max_tokens=12), use_tqdm=False)[0].outputs[0]

    # stop_token_ids: stops at the first occurrence, the id stays in token_ids
    stop_id = base.token_ids[4]
    first = list(base.token_ids).index(stop_id)
    out = llm.generate(prompt, greedy(max_tokens=12, stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == list(base.token_ids[: first + 1])
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id

    # stop strings: text is cut before the stop string, or kept with include_stop_str_in_output
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if stop.strip():
        cut = llm.generate(prompt, greedy(max_tokens=12, stop=[stop]), use_tqdm=False)[0].outputs[0]
        assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
        assert cut.stop_reason == stop
        kept = llm.generate(prompt, greedy(max_tokens=12, stop=[stop], include_stop_str_in_output=True),
                            use_tqdm=False)[0].outputs[0]
        assert kept.text == text[: text.index(stop) + len(stop)]

    # EOS: forced by logit_bias; stops at once unless ignore_eos, and not before min_tokens
    force_eos = {eos: 100.0}
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, logit_bias=force_eos),
                       use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == [eos] and out.finish_reason == "stop" and out.text == ""
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, logit_bias=force_eos,
                                              ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == [eos] * 8 and out.finish_reason == "length"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, logit_bias=force_eos,
                                              min_tokens=3), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos and eos not in out.token_ids[:3]


def test_skip_special_tokens(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    role = tokenizer.convert_tokens_to_ids("<|user|>")
    prompt = {"prompt_token_ids": [20, 21, 22]}
    bias = {role: 100.0}
    kept = llm.generate(prompt, greedy(max_tokens=2, logit_bias=bias, skip_special_tokens=False),
                        use_tqdm=False)[0].outputs[0]
    skipped = llm.generate(prompt, greedy(max_tokens=2, logit_bias=bias), use_tqdm=False)[0].outputs[0]
    assert list(kept.token_ids) == [role, role]
    assert "<|user|>" in kept.text and "<|user|>" not in skipped.text


def test_kv_slot_waste_on_a_mixed_workload_is_under_4_percent(tiny_checkpoints) -> None:
    # The ShareGPT-like length mix of the benchmarks, scaled to the tiny model's context.
    rng = np.random.default_rng(0)
    n = 48
    inputs = np.clip(rng.lognormal(np.log(150), 0.8, n), 1, 400).astype(int)
    outputs = np.clip(rng.lognormal(np.log(130), 0.8, n), 1, 100).astype(int)
    engine = make_engine(tiny_checkpoints["llama"], enable_prefix_caching=False)
    for i, (il, ol) in enumerate(zip(inputs, outputs)):
        prompt = rng.integers(10, 500, size=int(il)).tolist()
        engine.add_request(str(i), {"prompt_token_ids": prompt}, greedy(max_tokens=int(ol)))
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.get_stats()
    assert stats.kv_slots_allocated > 0
    assert stats.kv_slot_waste < 0.04, stats.kv_slot_waste


def test_metrics_report_queue_and_cache_state(tiny_checkpoints) -> None:
    # the stats of the step just run: the synchronous loop (async updates a step late)
    engine = make_engine(tiny_checkpoints["llama"], max_num_seqs=2, async_scheduling=False)
    for i, prompt in enumerate(make_prompts(512, seed=13, lengths=(20, 20, 20, 20))):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, greedy(max_tokens=3))
    engine.step()
    last = engine.get_stats().last
    assert (last.num_running, last.num_waiting, last.num_swapped) == (2, 2, 0)
    assert 0 < last.kv_cache_usage < 1
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.get_stats().last.kv_cache_usage == 0
