"""Structured-output grammars compile once per spec, never in the engine's step loop:
the offline engine compiles in the request builder into the engine core's cache; the server's
AsyncLLM compiles in a worker process and the engine only deserializes; a request whose grammar
is not ready waits outside the scheduler while the others keep stepping."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from pagedserve import SamplingParams, StructuredOutputsParams
from pagedserve.core.outputs import FinishReason
from pagedserve.core.request import Request
from pagedserve.engine.async_llm import AsyncLLM
from pagedserve.engine.request_builder import load_tokenizer
from pagedserve.structured_output import GrammarCompilerCache, GrammarError, clean_error, spec_digest
from tests.engine.engine_helpers import make_engine

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "enum": ["alpha", "beta", "gamma"]}},
          "required": ["word"], "additionalProperties": False}


def _count_compiles(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every call of the one compile function, wherever it happens in this process."""
    import pagedserve.structured_output as so

    calls: list[tuple[str, str]] = []
    real = so.compile_spec

    def counting(compiler: Any, key: tuple[str, str]) -> Any:
        calls.append(key)
        return real(compiler, key)

    monkeypatch.setattr(so, "compile_spec", counting)
    return calls


def test_offline_engine_compiles_each_spec_once(tiny_checkpoints: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_compiles(monkeypatch)
    engine = make_engine(tiny_checkpoints["llama"])
    spec = StructuredOutputsParams(json=SCHEMA)
    for i in range(2):  # the same spec twice, the second with n = 3 children
        engine.add_request(str(i), "the model runs", SamplingParams(
            temperature=1.0, seed=i, max_tokens=160, n=1 + 2 * i, structured_outputs=spec))  # room for whitespace
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    texts = [o.text for ro in finished.values() for o in ro.outputs]
    assert len(texts) == 4 and all(json.loads(t, strict=False)["word"] in ("alpha", "beta", "gamma") for t in texts)
    assert calls == [spec.key]  # once for 4 samples: the engine core built its matchers from the cache
    assert engine.engine_core.grammars.cache().num_compiles == 1


def _gated_engine(tiny_checkpoints: Any, gate: threading.Event) -> Any:
    """An engine core whose grammar compiles (in its background thread) wait for `gate`."""
    core = make_engine(tiny_checkpoints["llama"]).engine_core
    cache = core.grammars.cache()
    real = cache.compile

    def gated(spec: StructuredOutputsParams) -> Any:
        assert gate.wait(120)
        return real(spec)

    cache.compile = gated  # type: ignore[method-assign]
    return core


def test_a_request_waits_for_its_grammar_while_others_step(tiny_checkpoints: Any) -> None:
    gate = threading.Event()
    core = _gated_engine(tiny_checkpoints, gate)
    tokenizer = load_tokenizer(core.config)
    held_id = "held"
    plain = Request("plain", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), None)
    held = Request(held_id, [5, 6, 7], SamplingParams(
        temperature=0.0, max_tokens=30, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}")),
        tokenizer.eos_token_id)
    core.add_request(held)  # no serialized grammar: the engine compiles it, in the background
    core.add_request(plain)
    assert core.grammars.num_waiting == 1 and held_id not in core.scheduler.requests
    outputs: dict[str, list[Any]] = {}
    while "plain" not in outputs or outputs["plain"][-1].finish_reason is None:
        for out in core.step():
            outputs.setdefault(out.req_id, []).append(out)
    # the plain request ran to its end while the other one's grammar was still compiling
    assert sum(len(o.new_token_ids) for o in outputs["plain"]) == 4 and held_id not in outputs
    assert core.grammars.num_waiting == 1
    gate.set()
    while core.has_unfinished_requests():
        for out in core.step():
            outputs.setdefault(out.req_id, []).append(out)
    assert outputs[held_id][-1].finish_reason == FinishReason.STOP
    tokens = [t for o in outputs[held_id] for t in o.new_token_ids]
    assert tokenizer.decode(tokens, skip_special_tokens=True).strip().isdigit()


def test_a_grammar_that_fails_in_the_engine_aborts_only_its_request(tiny_checkpoints: Any) -> None:
    core = make_engine(tiny_checkpoints["llama"]).engine_core
    bad = Request("bad", [5, 6], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(open")), None)
    core.add_request(bad)
    core.add_request(Request("ok", [5, 6], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), None))
    finished: dict[str, Any] = {}
    while core.has_unfinished_requests():
        finished.update({o.req_id: o.finish_reason for o in core.step() if o.finish_reason is not None})
    assert finished == {"bad": FinishReason.ABORT, "ok": FinishReason.LENGTH}


def test_cache_evicts_only_unpinned_grammars(tiny_checkpoints: Any) -> None:
    pinned: set[str] = set()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    cache = GrammarCompilerCache(tokenizer, len(tokenizer), max_entries=1, is_pinned=pinned.__contains__)
    specs = [StructuredOutputsParams(regex=f"a{{{i}}}") for i in range(1, 4)]
    pinned.add(spec_digest(specs[0]))
    for spec in specs:
        cache.compile(spec)
    present = [cache.get(spec_digest(s)) is not None for s in specs]
    assert present == [True, False, True]  # the pinned one stays; one unpinned in the LRU
    pinned.clear()
    cache.evict()
    assert [cache.get(spec_digest(s)) is not None for s in specs] == [False, False, True]
    with pytest.raises(RuntimeError, match="before it was ready"):
        cache.matcher(specs[1])  # the step loop never compiles


def test_clean_error_drops_source_paths_and_check_noise() -> None:
    raw = ("[08:38:03] /project/cpp/json_schema_converter.cc:5077: Check failed: (error.empty()) is false: "
           "Failed to parse JSON: syntax error at line 1 near: . The JSON string is:{\"type\"\n")
    assert clean_error(raw) == "Failed to parse JSON: syntax error at line 1 near: ."
    assert clean_error("[08:38:03] /project/cpp/regex_converter.cc:94: Regex parsing error at position 3: "
                       "The parenthesis is not closed.\n") == "Regex parsing error at position 3: The parenthesis is not closed."


def test_async_llm_compiles_in_a_worker_and_the_engine_only_loads(
    tiny_checkpoints: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pagedserve.config import EngineArgs

    calls = _count_compiles(monkeypatch)  # this process: the engine (in-process) must not compile

    async def run() -> None:
        config = EngineArgs(model=tiny_checkpoints["llama"], max_model_len=256,
                            kv_cache_memory_bytes=8 << 20).create_engine_config()
        llm = await AsyncLLM.from_config(config, multiprocess=False)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=10,
                                    structured_outputs=StructuredOutputsParams(choice=["red", "blue"]))

            async def one(i: int) -> str:
                text = ""
                async for ro in llm.generate("pick", params.clone(), f"r{i}"):
                    text = ro.outputs[0].text
                return text

            texts = await asyncio.gather(*(one(i) for i in range(3)))
            assert set(texts) <= {"red", "blue"}
            assert llm.grammar_service().num_compiles == 1  # identical specs: one compile
            core = llm.client.core  # type: ignore[union-attr]
            assert core.grammars.cache().num_compiles == 0  # deserialized what the worker built
            with pytest.raises(GrammarError, match="regular expression is invalid"):
                await llm.compile_grammar(SamplingParams(structured_outputs=StructuredOutputsParams(regex="(x")))
        finally:
            await llm.shutdown()

    asyncio.run(run())
    assert calls == []
