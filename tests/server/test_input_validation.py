"""Bad input is a 400 naming the field, never a 5xx, on a real server (the engine in its own process,
so every request also crosses the msgspec IPC): lone UTF-16 surrogates, integers past their bounds
(2**64 and friends), booleans and strings where integers belong, non-ASCII logit_bias keys, and the
model's own bounds (vocabulary, max_logprobs). Good requests next to them are unaffected."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.server.conftest import RunningServer

CHAT = [{"role": "user", "content": "the cat"}]
VOCAB = 512  # the tiny llama's vocabulary (checked below through /detokenize)


def post(server: RunningServer, path: str, body: Any) -> httpx.Response:
    # ensure_ascii: a lone surrogate travels as its JSON escape "\ud800" (raw, it is not UTF-8)
    content = json.dumps(body, ensure_ascii=True)
    return httpx.post(server.base_url + path, content=content, timeout=60,
                      headers={"content-type": "application/json"})  # fmt: skip


def assert_400(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == 400 and isinstance(err["message"], str)
    assert err["param"] == param, err
    return str(err["message"])


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "the cat", "max_tokens": 2, "temperature": 0, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": CHAT, "max_tokens": 2, "temperature": 0, **fields}


# ---------------------------------------------------------------------------- lone surrogates


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", completion(prompt="a \ud800 b"), "prompt"),
        ("/v1/completions", completion(prompt=["fine", "bad \udfff"]), "prompt.[1]"),
        ("/v1/completions", completion(stop=["ok", "\ud800"]), "stop.[1]"),
        ("/v1/completions", completion(model="\ud800"), "model"),
        ("/v1/completions", completion(user="\udbff"), "user"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "\ud800"}]), "messages.[0].content"),
        ("/v1/chat/completions",
         chat(messages=[{"role": "system", "content": "s"},
                        {"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]),
         "messages.[1].content.[0].text"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "hi", "name": "\ud800"}]),
         "messages.[0].name"),
        ("/v1/chat/completions", chat(chat_template_kwargs={"k": "\ud800"}), "chat_template_kwargs.k"),
        ("/tokenize", {"model": "tiny", "prompt": "\ud800"}, "prompt"),
        ("/tokenize", {"model": "tiny", "messages": [{"role": "user", "content": "\udfff"}]},
         "messages.[0].content"),
    ],
)  # fmt: skip
def test_lone_surrogates_are_400_naming_the_field(
    api_server: RunningServer, path: str, body: dict[str, Any], param: str
) -> None:
    message = assert_400(post(api_server, path, body), param)
    assert "surrogate" in message


def test_surrogate_in_a_key_and_paired_surrogates(api_server: RunningServer) -> None:
    r = post(api_server, "/v1/completions", completion(logit_bias={"\ud800": 1.0}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias.\\ud800"
    # A surrogate PAIR is one valid character (here an emoji): accepted everywhere.
    emoji = "cat \ud83d\ude00"
    r = post(api_server, "/v1/completions", completion(prompt=emoji, echo=True))
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("cat \U0001f600")
    r = post(api_server, "/tokenize", {"model": "tiny", "prompt": emoji})
    assert r.status_code == 200 and r.json()["count"] > 0
    r = post(api_server, "/v1/chat/completions", chat(messages=[{"role": "user", "content": emoji}]))
    assert r.status_code == 200


# ---------------------------------------------------------------------------- integer bounds


BIG = [2**64, 2**64 + 1, 10**30, -(2**64)]


@pytest.mark.parametrize("value", BIG)
@pytest.mark.parametrize(
    "field", ["priority", "top_k", "truncate_prompt_tokens", "seed", "n", "best_of", "max_tokens",
              "min_tokens", "logprobs", "prompt_logprobs"],
)  # fmt: skip
def test_completion_ints_past_their_bounds(api_server: RunningServer, field: str, value: int) -> None:
    assert_400(post(api_server, "/v1/completions", completion(**{field: value})), field)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "top_logprobs", "priority", "seed"])
def test_chat_ints_past_their_bounds(api_server: RunningServer, field: str) -> None:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    assert_400(post(api_server, "/v1/chat/completions", chat(**{field: 2**64, **extra})), field)


def test_int_bounds_inside_lists_and_dicts(api_server: RunningServer) -> None:
    assert_400(post(api_server, "/v1/completions", completion(stop_token_ids=[3, 2**64])), "stop_token_ids.[1]")
    assert_400(post(api_server, "/v1/completions", completion(logit_bias={str(2**64): 1.0})), "logit_bias")
    assert_400(post(api_server, "/v1/completions", completion(prompt=[1, 2, 2**64])), "prompt")
    assert_400(post(api_server, "/v1/completions", completion(prompt=[[1, 2], [2**64]])), "prompt")
    assert_400(post(api_server, "/detokenize", {"model": "tiny", "tokens": [1, 2**64]}), "tokens.[1]")


def test_priority_between_int64_and_uint64(api_server: RunningServer) -> None:
    # 2**63 fits msgpack's uint64 but not the int64 a priority is: refused here, not in the engine
    assert_400(post(api_server, "/v1/completions", completion(priority=2**63)), "priority")
    assert_400(post(api_server, "/v1/completions", completion(priority=-(2**63) - 1)), "priority")


def test_extreme_values_inside_the_bounds_work(api_server: RunningServer) -> None:
    """The edges that pass validation also pass the IPC and the engine."""
    for fields in (
        {"priority": 2**63 - 1}, {"priority": -(2**63)}, {"seed": 2**64 - 1, "temperature": 1.0, "n": 2},
        {"seed": -(2**63), "temperature": 1.0}, {"top_k": 2**31 - 1, "temperature": 1.0},
        {"truncate_prompt_tokens": 2**31 - 1}, {"logit_bias": {str(VOCAB - 1): 100.0}},
    ):  # fmt: skip
        r = post(api_server, "/v1/completions", completion(**fields))
        assert r.status_code == 200, (fields, r.text)
        assert all(c["finish_reason"] == "length" for c in r.json()["choices"])


# ---------------------------------------------------------------------------- strict types


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", True), ("max_tokens", False), ("max_tokens", "2"), ("max_tokens", 2.5), ("n", True),
     ("seed", False), ("top_k", True), ("logprobs", True), ("priority", True), ("min_tokens", "0"),
     ("temperature", True), ("top_p", "0.5"), ("stop_token_ids", [True])],
)  # fmt: skip
def test_booleans_and_strings_are_not_numbers(api_server: RunningServer, field: str, value: Any) -> None:
    message = assert_400(post(api_server, "/v1/completions", completion(**{field: value})),
                         field + (".[0]" if field == "stop_token_ids" else ""))  # fmt: skip
    assert "valid" in message


def test_integral_floats_are_integers(api_server: RunningServer) -> None:
    """2.0 is read as 2 (as vLLM does), so clients that send JSON numbers as floats keep working."""
    r = post(api_server, "/v1/completions", completion(max_tokens=3.0, n=2.0, logprobs=1.0, ignore_eos=True))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 2 and body["usage"]["completion_tokens"] == 6
    assert all(len(c["logprobs"]["tokens"]) == 3 for c in body["choices"])


@pytest.mark.parametrize("key", ["\u0663", "\uff13", " 3", "3 ", "+3", "1_0", "0x3", "-1", "", "3.0"])
def test_logit_bias_keys_are_ascii_digits(api_server: RunningServer, key: str) -> None:
    # "\u0663" is ARABIC-INDIC DIGIT THREE and "\uff13" FULLWIDTH DIGIT THREE: int() reads both as 3
    message = assert_400(post(api_server, "/v1/completions", completion(logit_bias={key: 5.0})), "logit_bias")
    assert "ASCII digits" in message


def test_logit_bias_ascii_key_still_applies(api_server: RunningServer) -> None:
    r = post(api_server, "/v1/completions", completion(max_tokens=3, logit_bias={"7": 100.0}, ignore_eos=True,
                                                       logprobs=0))  # fmt: skip
    assert r.status_code == 200, r.text
    # +100 on token 7 makes it the greedy choice at every step
    assert r.json()["choices"][0]["logprobs"]["tokens"] == [post(api_server, "/detokenize", {"model": "tiny", "tokens": [7]}).json()["prompt"]] * 3


# ---------------------------------------------------------------------------- the model's bounds


def test_model_bounds_name_the_field(api_server: RunningServer) -> None:
    assert post(api_server, "/detokenize", {"model": "tiny", "tokens": [VOCAB - 1]}).status_code == 200
    assert_400(post(api_server, "/detokenize", {"model": "tiny", "tokens": [VOCAB]}), "tokens")
    assert_400(post(api_server, "/v1/completions", completion(stop_token_ids=[VOCAB])), "stop_token_ids")
    assert_400(post(api_server, "/v1/completions", completion(logit_bias={str(VOCAB): 1.0})), "logit_bias")
    assert_400(post(api_server, "/v1/completions", completion(logprobs=21)), "logprobs")
    assert_400(post(api_server, "/v1/completions", completion(prompt_logprobs=21)), "prompt_logprobs")
    assert_400(post(api_server, "/v1/completions", completion(prompt=[VOCAB])), "prompt")
    assert_400(post(api_server, "/v1/chat/completions", chat(logprobs=True, top_logprobs=21)), "top_logprobs")
    assert_400(post(api_server, "/v1/chat/completions", chat(stop_token_ids=[VOCAB])), "stop_token_ids")


def test_good_requests_are_unaffected(api_server: RunningServer) -> None:
    r = post(api_server, "/v1/completions", completion(
        prompt=["the cat", "a dog"], max_tokens=4, n=2, best_of=2, seed=3, top_k=5, min_tokens=1,
        logprobs=2, stop_token_ids=[5], logit_bias={"9": -1.5}, priority=-4, truncate_prompt_tokens=8,
        temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=-0.5,
    ))  # fmt: skip
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    r = post(api_server, "/v1/chat/completions", chat(max_completion_tokens=3, logprobs=True, top_logprobs=2,
                                                      seed=1, priority=2))  # fmt: skip
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["content"]) == r.json()["usage"]["completion_tokens"]
    r = post(api_server, "/tokenize", {"model": "tiny", "prompt": "the cat \u00e9\u4e2d"})
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) > 0


# ---------------------------------------------------------------------------- the pieces, without a server


def test_lone_surrogate_path() -> None:
    from pagedserve.entrypoints.openai.protocol import lone_surrogate_path

    assert lone_surrogate_path({"a": ["ok", {"b": "x\ud800"}]}) == "a.[1].b"
    assert lone_surrogate_path("\udfff") == "body" and lone_surrogate_path(["\udfff"]) == "[0]"
    assert lone_surrogate_path({"k\ud800": 1}) == "k\\ud800"
    assert lone_surrogate_path({"a": "\U0001f600 \u0663", "b": [1, 2.5, None, True]}) is None  # JSON pairs decode to one
    deep: Any = "\ud800"
    for _ in range(100_000):  # iterative: no RecursionError however deep
        deep = [deep]
    assert lone_surrogate_path(deep) is not None


def test_scoring_sampling_params() -> None:
    """A scoring request samples one greedy token (dropped later) and asks for the prompt's
    logprobs with `logprobs` top entries; nothing about the sampled token is computed."""
    from pagedserve.entrypoints.openai.protocol import CompletionRequest
    from pagedserve.sampling_params import SamplingParams

    req = CompletionRequest.model_validate({"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": 3,
                                            "temperature": 0.9, "min_tokens": 0})  # fmt: skip
    assert req.is_scoring
    sp = SamplingParams(**req.to_sampling_params(default_max_tokens=100))
    assert (sp.max_tokens, sp.temperature, sp.logprobs, sp.prompt_logprobs) == (1, 0.0, None, 3)
    plain = CompletionRequest.model_validate({"prompt": "x", "echo": True, "max_tokens": 2, "logprobs": 3,
                                              "prompt_logprobs": 1})  # fmt: skip
    assert not plain.is_scoring
    kwargs = plain.to_sampling_params(default_max_tokens=100)
    assert (kwargs["max_tokens"], kwargs["logprobs"], kwargs["prompt_logprobs"]) == (2, 3, 3)
