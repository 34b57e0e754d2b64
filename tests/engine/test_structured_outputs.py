"""Structured outputs (SamplingParams.structured_outputs, enforced with xgrammar): the generated
text follows the JSON schema / regex / choice / grammar, also under preemption and n > 1, and a
bad spec is a clear error before it reaches the engine."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from pagedserve import LLM, SamplingParams, StructuredOutputsParams

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_checkpoints: Any) -> LLM:
    return LLM(tiny_checkpoints["llama"], max_model_len=512, kv_cache_memory_bytes=8 << 20)


def _generate(llm: LLM, spec: StructuredOutputsParams, n: int = 4, complete: bool = True) -> list[str]:
    """Texts of n samples; with complete=False also those cut off by max_tokens (a free-form JSON
    object may run long on random weights), else only finished ones (asserted to be all)."""
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=200, structured_outputs=spec, n=n)
    out = llm.generate("the model runs", params, use_tqdm=False)[0]
    if complete:
        assert all(o.finish_reason == "stop" for o in out.outputs)
    return [o.text for o in out.outputs if o.finish_reason == "stop"]


def _json(text: str) -> Any:
    # strict=False: xgrammar's JSON strings admit raw control characters (as in vLLM), which
    # Python's strict parser refuses
    return json.loads(text, strict=False)


def test_json_schema(llm: LLM) -> None:
    for text in _generate(llm, StructuredOutputsParams(json=SCHEMA)):
        value = _json(text)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int) and len(value["name"]) <= 8


def test_json_object_regex_choice_grammar(llm: LLM) -> None:
    for text in _generate(llm, StructuredOutputsParams(json_object=True), n=6, complete=False):
        assert isinstance(_json(text), dict)
    for text in _generate(llm, StructuredOutputsParams(regex=r"[a-c]{2,5}-\d{3}")):
        assert re.fullmatch(r"[a-c]{2,5}-\d{3}", text)
    choices = ["yes", "no", "maybe later"]
    texts = _generate(llm, StructuredOutputsParams(choice=choices), n=6)
    assert set(texts) <= set(choices)
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for text in _generate(llm, StructuredOutputsParams(grammar=grammar)):
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text)


def test_greedy_structured_and_plain_requests_share_a_batch(llm: LLM) -> None:
    prompts = ["the model runs", "a cat sees the river", "one two three"]
    params = [SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=StructuredOutputsParams(choice=["a b", "c"])),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=120, structured_outputs=StructuredOutputsParams(regex=r"\d{1,6}"))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[0].outputs[0].text in ("a b", "c")
    alone = llm.generate(prompts[1], params[1], use_tqdm=False)[0]
    assert outs[1].outputs[0].token_ids == alone.outputs[0].token_ids  # the mask touches only its row
    assert re.fullmatch(r"\d{1,6}", outs[2].outputs[0].text)


def test_structured_output_survives_preemption(tiny_checkpoints: Any) -> None:
    # a pool too small for all four at once: requests are preempted (recompute) and resumed,
    # their grammar matchers (in the engine core) carried across it with the tokens generated so far
    small = LLM(tiny_checkpoints["llama"], max_model_len=512, num_gpu_blocks_override=40,
                kv_cache_memory_bytes=8 << 20, max_num_seqs=4)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=150,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    outs = small.generate(["the model runs " * 20] * 4, params, use_tqdm=False)
    assert small.llm_engine.engine_core.scheduler.num_preemptions > 0
    for out in outs:
        _json(out.outputs[0].text)


def test_bad_specs_are_clear_errors(llm: LLM) -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(json=SCHEMA, regex="a")
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    for spec in (StructuredOutputsParams(json='{"type": "object", "properties": 3}'),
                 StructuredOutputsParams(regex="(unclosed"),
                 StructuredOutputsParams(grammar="root ::= undefined_rule")):
        with pytest.raises(ValueError, match="invalid structured output"):
            llm.generate("x", SamplingParams(structured_outputs=spec), use_tqdm=False)
    # a dict of fields is accepted for vLLM-style construction
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs == StructuredOutputsParams(regex="a+")


def test_structured_outputs_with_async_scheduling(tiny_checkpoints: Any) -> None:
    """Structured requests sample on the host (never plain greedy), so async steps of plain greedy
    requests and synchronous steps with grammars interleave; both give their sync results."""
    prompts = ["the model runs", "a cat sees the river", "one two three"]
    params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=4, max_tokens=150, structured_outputs=StructuredOutputsParams(json=SCHEMA)),
              SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)]
    results = []
    for async_scheduling in (False, True):
        engine = LLM(tiny_checkpoints["llama"], max_model_len=512, kv_cache_memory_bytes=8 << 20,
                     async_scheduling=async_scheduling)
        results.append([o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)])
    assert results[0] == results[1]
