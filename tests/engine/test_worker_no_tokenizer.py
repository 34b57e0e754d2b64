"""The worker needs no tokenizer and no grammar: the engine core fills the structured-output
bitmasks after scheduling and hands them over with the plan (SchedulerOutput.grammar, as vLLM's
GrammarOutput); the worker only applies them to the logits. num_computed_tokens has one writer on
the worker side, the plan."""

from __future__ import annotations

import re
import sys
from typing import Any

import pytest
import torch
import transformers

from pagedserve import EngineArgs, SamplingParams, StructuredOutputsParams
from pagedserve.core.outputs import GrammarOutput, NewRequestData, SchedulerOutput
from pagedserve.worker.model_runner import ModelRunner
from tests.engine.engine_helpers import make_engine

pytest.importorskip("xgrammar")

PATTERN = r"(alpha|beta)-[0-9]{2}"  # a fixed shape: it ends well within max_tokens on any weights


def _refuse(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the worker constructed {what}")

    return refuse


def _called_from_worker() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if "/pagedserve/worker/" in frame.f_code.co_filename.replace("\\", "/"):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def test_runner_applies_the_plans_bitmask_without_any_tokenizer(
    tiny_checkpoints: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare ModelRunner (no engine core, no grammar cache) runs a structured request from a
    plan that carries its bitmask, with every tokenizer loader refusing to run."""
    import pagedserve.engine.request_builder as request_builder

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _refuse("a tokenizer"))
    monkeypatch.setattr(request_builder, "load_tokenizer", _refuse("a tokenizer"))
    config = EngineArgs(model=tiny_checkpoints["llama"], dtype="float32", device="cpu", max_model_len=64,
                        kv_cache_memory_bytes=1 << 20).create_engine_config()
    runner = ModelRunner(config)
    runner.initialize_kv_cache(*runner.determine_num_blocks())
    vocab = runner.vocab_size
    allowed = [11, 42, vocab - 1]  # any token ids: the mask, not a grammar, decides here
    words = [0] * ((vocab + 31) // 32)  # xgrammar's layout: bit t % 32 of word t // 32 = token t
    for token in allowed:
        words[token // 32] |= 1 << (token % 32)
    bitmask = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in words]], dtype=torch.int32)
    mask = (bitmask.numpy().tobytes(), bitmask.shape[1])  # as the engine core sends it
    spec = StructuredOutputsParams(regex="a+")  # never compiled: the worker must not look at it
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = [5, 6, 7, 8]

    def plan(step: int, seed: int, grammar: GrammarOutput | None) -> SchedulerOutput:
        # the structured request is row 1 of 2 (a compact bitmask spread to the sampling rows)
        reqs = [NewRequestData(f"plain{step}", prompt, [], plain, [2 * step], 0, None),
                NewRequestData(f"s{step}", prompt, [], SamplingParams(temperature=1.0, seed=seed,
                               structured_outputs=spec), [2 * step + 1], 0, None)]
        return SchedulerOutput(reqs, [], {r.req_id: len(prompt) for r in reqs}, 2 * len(prompt),
                               {f"plain{step - 1}", f"s{step - 1}"}, grammar=grammar)

    free = []  # the same seeds without a mask: the tokens the mask kept away
    for step in range(1, 5):
        unmasked = runner.execute_model(plan(2 * step, step, None)).sampled_token_ids
        out = runner.execute_model(plan(2 * step + 1, step, GrammarOutput([f"s{2 * step + 1}"], *mask)))
        assert out.sampled_token_ids[f"s{2 * step + 1}"] in allowed
        # the mask touches only its own row
        assert out.sampled_token_ids[f"plain{2 * step + 1}"] == unmasked[f"plain{2 * step}"]
        free.append(unmasked[f"s{2 * step}"])
    assert not set(free) <= set(allowed)
    # one writer: the worker's state keeps the plan's num_computed_tokens, never advances it
    assert runner.states["s9"].num_computed_tokens == 0


def test_in_process_structured_request_never_reaches_a_tokenizer_from_the_worker(
    tiny_checkpoints: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process engine: the tokenizer loader, the grammar cache and xgrammar's matcher refuse
    to run under a worker frame, while structured requests (n = 2, plus a plain one) run."""
    import xgrammar

    import pagedserve.engine.request_builder as request_builder
    from pagedserve.structured_output import GrammarCompilerCache

    def guard(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if _called_from_worker():
                raise AssertionError(f"the worker called {name}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, guarded)

    guard(transformers.AutoTokenizer, "from_pretrained")
    guard(request_builder, "load_tokenizer")
    for name in ("get", "load", "compile", "matcher", "allocate_bitmask"):
        guard(GrammarCompilerCache, name)
    guard(xgrammar, "GrammarMatcher")
    engine = make_engine(tiny_checkpoints["llama"])
    spec = StructuredOutputsParams(regex=PATTERN)
    engine.add_request("s", "the model runs", SamplingParams(temperature=1.0, seed=1, max_tokens=40, n=2,
                                                             structured_outputs=spec))
    engine.add_request("p", "the model runs", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    outputs = finished["s"].outputs
    assert len(outputs) == 2 and all(o.finish_reason == "stop" and re.fullmatch(PATTERN, o.text) for o in outputs)
    assert len(finished["p"].outputs[0].token_ids) == 5
    assert not engine.engine_core.grammars._matchers  # released with their requests


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_plan_carries_a_mask_row_exactly_when_a_structured_request_samples(
    tiny_checkpoints: Any, async_scheduling: bool
) -> None:
    """plan.grammar is None on every step without a sampling structured request (plain requests
    alone, and the structured request's own prompt chunks under chunked prefill); a step where it
    samples carries one row for it, and its tokens follow the pattern."""
    engine = make_engine(tiny_checkpoints["llama"], max_num_batched_tokens=32, async_scheduling=async_scheduling)
    core = engine.engine_core
    seen: list[tuple[dict[str, int], list[str] | None]] = []
    real_launch = core.runner.launch

    def launch(plan: SchedulerOutput) -> Any:  # every step passes here (execute_model too)
        seen.append((dict(plan.num_scheduled_tokens), None if plan.grammar is None else list(plan.grammar.req_ids)))
        return real_launch(plan)

    core.runner.launch = launch  # type: ignore[method-assign]
    engine.add_request("p", {"prompt_token_ids": list(range(20, 30))},
                       SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    for _ in range(3):  # plain steps first: nothing structured is live
        engine.step()
    engine.add_request("s", {"prompt_token_ids": list(range(40, 140))},  # 100 tokens: 4 chunks at 32
                       SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=StructuredOutputsParams(
                           regex=PATTERN)))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert all(rows is None for _, rows in seen[:3])
    s_steps = [(num["s"], rows) for num, rows in seen if "s" in num]
    computed = 0
    for num, rows in s_steps:
        computed += num
        assert rows == (["s"] if computed >= 100 else None)  # a row only once its prompt is done
    assert len([1 for _, rows in s_steps if rows is None]) >= 3  # the prompt took several chunks
    assert finished["s"].outputs[0].finish_reason == "stop" and re.fullmatch(PATTERN, finished["s"].outputs[0].text)
    assert not core.grammars._live and not core.grammars._matchers
