"""Property: whatever JSON a client sends, the server never answers 5xx, and a refusal is a 4xx with
the OpenAI error body. Hypothesis draws request bodies over the request schema (each field either a
plausible value, an edge of its range, or a value of the wrong type) against the real server, so the
msgspec IPC and the engine are in the path. The cases of issue 8 are seeded with @example.

Bounded for CI: PAGEDSERVE_FUZZ_EXAMPLES examples (default 60), derandomized (the same inputs on
every run, so a failure reproduces), small max_tokens and n so that good requests stay cheap.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.server.conftest import RunningServer

EXAMPLES = int(os.environ.get("PAGEDSERVE_FUZZ_EXAMPLES", "60"))

# A body is drawn as a mostly valid request (so that good requests reach the engine, its streams
# and logprobs) in which 0-2 fields are then replaced by a bad value: an edge of an integer range
# that has bitten (int32/int64/uint64), a wrong type (booleans: True == 1 in Python), or odd text
# (lone surrogates, an emoji that JSON writes as a surrogate pair, a non-ASCII digit).
EDGES = [2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, 0, -(2**63), -(2**63) - 1, -(2**64)]
WRONG = st.sampled_from([True, False, None, "2", 2.5, 2.0, [], {}, -1e308])
ODD = ["\ud800", "a\udfffb", "\udbff\udc00", "\ud83d\ude00", "\u0663", "", " ", "\x00", "{{ x }}", "</s>"]
BAD_TEXT = st.one_of(st.sampled_from(ODD), st.lists(st.sampled_from(ODD + ["the", "cat"]), min_size=1, max_size=4).map("".join))
TEXT = st.text(max_size=12)  # hypothesis leaves surrogates out of text()
BAD = st.one_of(st.sampled_from(EDGES), WRONG, BAD_TEXT, st.lists(st.one_of(st.sampled_from(EDGES), BAD_TEXT), min_size=1, max_size=2),
                st.dictionaries(st.one_of(BAD_TEXT, st.sampled_from(EDGES).map(str)), st.floats(-3, 3), min_size=1, max_size=2))
IDS = st.lists(st.integers(0, 511), min_size=1, max_size=6)
FRACTION = st.floats(0.01, 1.0)

SAMPLING: dict[str, st.SearchStrategy[Any]] = dict(
    n=st.integers(1, 2), seed=st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 2**64 - 1, -(2**63)])),
    temperature=st.floats(0, 2), top_p=FRACTION, top_k=st.one_of(st.integers(-1, 600), st.just(2**31 - 1)),
    min_p=st.floats(0, 1), presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2),
    repetition_penalty=st.floats(0.5, 2), min_tokens=st.integers(0, 2), ignore_eos=st.booleans(),
    priority=st.integers(-(2**63), 2**63 - 1), truncate_prompt_tokens=st.integers(1, 300),
    stop=st.one_of(TEXT, st.lists(TEXT.filter(bool), max_size=2)), stop_token_ids=st.lists(st.integers(0, 511), max_size=3),
    logit_bias=st.dictionaries(st.integers(0, 511).map(str), st.floats(-100, 100), max_size=3),
    stream=st.booleans(), stream_options=st.fixed_dictionaries({"include_usage": st.booleans()}),
    user=TEXT, request_id=TEXT, best_of=st.integers(1, 2), model=st.just("tiny"),
)  # fmt: skip
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2))})  # fmt: skip
SHAPES: dict[str, tuple[dict[str, st.SearchStrategy[Any]], dict[str, st.SearchStrategy[Any]]]] = {
    # path: (required fields, optional fields), all with valid values
    "/v1/completions": (
        {"prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=2), IDS, st.lists(IDS, min_size=1, max_size=2)),
         "max_tokens": st.integers(1, 4)},
        {**SAMPLING, "echo": st.booleans(), "logprobs": st.integers(0, 3), "prompt_logprobs": st.integers(0, 3)},
    ),
    "/v1/chat/completions": (
        {"messages": st.lists(MESSAGE, min_size=1, max_size=3), "max_completion_tokens": st.integers(1, 4)},
        {**SAMPLING, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3), "echo": st.booleans(),
         "add_generation_prompt": st.booleans(), "continue_final_message": st.booleans(),
         "chat_template_kwargs": st.dictionaries(st.sampled_from(["a", "b"]), TEXT, max_size=2)},
    ),
    "/tokenize": ({"prompt": TEXT}, {"model": st.just("tiny"), "add_special_tokens": st.booleans(),
                                     "return_token_strs": st.booleans()}),
    "/detokenize": ({"tokens": IDS}, {"model": st.just("tiny")}),
}  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    path = draw(st.sampled_from(sorted(SHAPES)))
    required, optional = SHAPES[path]
    body = draw(st.fixed_dictionaries(required, optional=optional))
    names = sorted({*required, *optional}) + ["messages"] if path == "/tokenize" else sorted({*required, *optional})
    for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):
        body[name] = draw(BAD)
    return path, body


def _check_error(err: Any, status: int) -> None:
    assert isinstance(err, dict), err
    assert isinstance(err.get("message"), str) and err["message"], err
    assert isinstance(err.get("type"), str) and err["type"] != "server_error", err
    assert err.get("code") == status, err


def _check(server: RunningServer, path: str, body: dict[str, Any]) -> None:
    content = json.dumps(body, ensure_ascii=True)  # lone surrogates travel as "\ud800" escapes
    headers = {"content-type": "application/json"}
    with httpx.stream("POST", server.base_url + path, content=content, headers=headers, timeout=120) as r:
        raw = r.read().decode("utf-8")
    assert r.status_code < 500, (path, body, raw)
    if r.status_code >= 400:
        assert 400 <= r.status_code < 500
        _check_error(json.loads(raw).get("error"), r.status_code)
        return
    assert r.status_code == 200, raw
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", raw
        for event in events[:-1]:
            chunk = json.loads(event)
            if "error" in chunk:  # an error after the 200 headers: still a client error, not a crash
                _check_error(chunk["error"], chunk["error"].get("code"))
                assert chunk["error"]["code"] < 500, chunk
    else:
        json.loads(raw)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(requests())
@example(("/v1/completions", {"prompt": "\ud800", "max_tokens": 1}))
@example(("/v1/completions", {"prompt": ["ok", "x\udfff"], "max_tokens": 1}))
@example(("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 1}))
@example(("/tokenize", {"prompt": "\udbff"}))
@example(("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}))
@example(("/v1/completions", {"prompt": "hi", "max_tokens": 1, "priority": 2**64}))
@example(("/v1/completions", {"prompt": "hi", "max_tokens": 1, "priority": 2**63}))
@example(("/v1/completions", {"prompt": "hi", "max_tokens": 1, "top_k": 2**64}))
@example(("/v1/completions", {"prompt": "hi", "max_tokens": 1, "truncate_prompt_tokens": 2**64}))
@example(("/v1/completions", {"prompt": "hi", "max_tokens": 1, "seed": 2**64}))
@example(("/v1/completions", {"prompt": "hi", "max_tokens": 1, "stop_token_ids": [2**64]}))
@example(("/v1/completions", {"prompt": "hi", "max_tokens": 1, "logit_bias": {str(2**64): 1}}))
@example(("/v1/completions", {"prompt": [2**64], "max_tokens": 1}))
@example(("/v1/completions", {"prompt": "hi", "max_tokens": True}))
@example(("/v1/completions", {"prompt": "hi", "max_tokens": 1, "logit_bias": {"\u0663": 5}}))
@example(("/v1/completions", {"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 2, "stream": True}))
@example(("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                   "logprobs": True, "top_logprobs": 2**64}))
@example(("/detokenize", {"tokens": [2**64]}))
def test_never_5xx(api_server: RunningServer, request_: tuple[str, dict[str, Any]]) -> None:
    path, body = request_
    _check(api_server, path, body)
