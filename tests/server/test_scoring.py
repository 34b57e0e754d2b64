"""The legacy OpenAI scoring call: /v1/completions with echo=true, logprobs=N, max_tokens=0 answers
with the prompt itself and its token logprobs (nothing generated). The logprobs are checked against
a transformers forward pass over the same checkpoint: log_softmax(logits[i - 1])[ids[i]]."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.server.conftest import RunningServer

PROMPTS = ["the cat sees the river", "one two three four five"]
TOP = 3
ATOL = 1e-4  # float32 on both sides


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def reference(hf: Any, ids: list[int]) -> tuple[list[float], list[list[float]]]:
    """Per prompt token i >= 1: (its logprob given ids[:i], the TOP largest logprobs there)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    tops = [logprobs[i - 1].topk(TOP).values.tolist() for i in range(1, len(ids))]
    return chosen, tops


def check_choice(choice: Any, text: str, ids: list[int], tok: Any, hf: Any) -> None:
    """One scoring choice (a dict as the JSON has it) against the reference."""
    assert choice["text"] == text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in ids]
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # as OpenAI: nothing predicts it
    chosen, tops = reference(hf, ids)
    assert lp["token_logprobs"][1:] == pytest.approx(chosen, abs=ATOL)
    for got, want in zip(lp["top_logprobs"][1:], tops):
        # keyed by token text, so tokens with the same text share one entry: compare as sets of values
        assert 1 <= len(got) <= TOP
        assert max(got.values()) == pytest.approx(want[0], abs=ATOL)
        assert all(any(abs(v - w) <= ATOL for w in want) for v in got.values())


@pytest.fixture(scope="module")
def llama(hf_reference: Callable[[str], tuple[Any, Any]]) -> tuple[Any, Any]:
    return hf_reference("llama")


def test_scoring_a_text_prompt_equals_a_forward_pass(api_server: RunningServer, llama: tuple[Any, Any]) -> None:
    hf, tok = llama
    r = client(api_server).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=0, echo=True,
                                              logprobs=TOP)  # fmt: skip
    ids = tok.encode(PROMPTS[0])
    assert len(r.choices) == 1
    check_choice(r.choices[0].model_dump(), PROMPTS[0], ids, tok, hf)
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 0, len(ids))


def test_scoring_token_prompts_batches_and_n(api_server: RunningServer, llama: tuple[Any, Any]) -> None:
    hf, tok = llama
    batch = [tok.encode(p) for p in PROMPTS]
    c = client(api_server)
    r = c.completions.create(model="tiny", prompt=batch, max_tokens=0, echo=True, logprobs=TOP, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    for ch in r.choices:
        ids = batch[ch.index // 2]
        check_choice(ch.model_dump(), tok.decode(ids), ids, tok, hf)
    assert r.usage is not None and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == sum(len(ids) for ids in batch)  # each prompt counted once, as n shares it
    # a list of text prompts, each scored on its own
    r = c.completions.create(model="tiny", prompt=PROMPTS, max_tokens=0, echo=True, logprobs=TOP)
    for ch, text in zip(r.choices, PROMPTS):
        check_choice(ch.model_dump(), text, tok.encode(text), tok, hf)


def test_scoring_streamed(api_server: RunningServer, llama: tuple[Any, Any]) -> None:
    hf, tok = llama
    body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": 0, "echo": True, "logprobs": TOP, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", api_server.v1 + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [ch for e in events for ch in e["choices"]]
    # one chunk per choice: the whole prompt with its logprobs, finished
    assert sorted(ch["index"] for ch in choices) == [0, 1, 2, 3]
    for ch in choices:
        text = PROMPTS[ch["index"] // 2]
        check_choice(ch, text, tok.encode(text), tok, hf)
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["completion_tokens"] == 0
    assert usage["prompt_tokens"] == sum(len(tok.encode(p)) for p in PROMPTS)


def test_scoring_without_logprobs_and_its_limits(api_server: RunningServer) -> None:
    c = client(api_server)
    r = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=0, echo=True)
    assert r.choices[0].text == PROMPTS[1] and r.choices[0].logprobs is None
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as info:  # max_tokens 0 only scores: echo needed
        c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=0)
    assert "echo" in str(info.value) and info.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=21)
    assert info.value.body["param"] == "logprobs"  # type: ignore[index]


def test_echo_logprobs_stream_carries_the_prompt_logprobs(api_server: RunningServer, llama: tuple[Any, Any]) -> None:
    """echo + logprobs with generation, streamed: the first chunk's prompt part has real logprobs
    (not nulls), equal to the non-streamed answer."""
    hf, tok = llama
    base = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 3, "echo": True, "logprobs": 1,
            "temperature": 0}  # fmt: skip
    full = httpx.post(api_server.v1 + "/completions", json=base, timeout=60).json()["choices"][0]["logprobs"]
    with httpx.stream("POST", api_server.v1 + "/completions", json={**base, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed: list[Any] = []
    for e in events:
        for ch in e["choices"]:
            streamed += ch["logprobs"]["token_logprobs"]
    n = len(tok.encode(PROMPTS[0]))
    assert streamed[0] is None and all(v is not None for v in streamed[1:])
    assert streamed == pytest.approx(full["token_logprobs"], abs=ATOL)
    assert streamed[1:n] == pytest.approx(reference(hf, tok.encode(PROMPTS[0]))[0], abs=ATOL)


def test_scoring_with_return_token_ids_returns_no_generated_ids(api_server: RunningServer) -> None:
    """The one token the engine samples for a scoring request is dropped from token_ids too."""
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 0, "echo": True, "return_token_ids": True}
    choice = httpx.post(api_server.v1 + "/completions", json=body, timeout=60).json()["choices"][0]
    assert (choice["prompt_token_ids"], choice["token_ids"]) == ([5, 6, 7, 8], [])
    with httpx.stream("POST", api_server.v1 + "/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[]]
