"""OpenAI protocol models: parsing, bounds -> 400 with `param`, to_sampling_params, error handlers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from pagedserve.entrypoints.openai.errors import (
    OpenAIError,
    from_pydantic,
    install_exception_handlers,
    model_not_found,
)
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from pagedserve.entrypoints.openai.responses import (
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    CompletionResponse,
    CompletionResponseChoice,
    DeltaMessage,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
    sse_event,
)
from pagedserve.sampling_params import SamplingParams

CHAT = [{"role": "user", "content": "hi"}]


def _bad(cls: type[BaseModel], body: dict[str, Any]) -> OpenAIError:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    err = from_pydantic(info.value)
    assert err.status == 400 and err.type == "invalid_request_error"
    return err


# ---------------------------------------------------------------------------- completions


def test_completion_defaults_to_sampling_params() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "hello"})
    kwargs = req.to_sampling_params(default_max_tokens=100)
    assert kwargs == {
        "n": 1,
        "max_tokens": 16,  # the OpenAI completions default, not default_max_tokens
        "min_tokens": 0,
        "stop": [],
        "stop_token_ids": [],
        "ignore_eos": False,
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "include_stop_str_in_output": False,
    }
    sp = SamplingParams(**kwargs)
    assert sp.max_tokens == 16 and sp.temperature == 1.0


def test_completion_all_knobs_reach_sampling_params() -> None:
    body = {
        "model": "m",
        "prompt": [1, 2, 3],
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "n": 2,
        "stop": "END",
        "seed": 1234,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"5": 200.0, "7": -1},
        "logprobs": 3,
        "echo": True,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "min_tokens": 2,
        "stop_token_ids": [9, 10],
        "skip_special_tokens": False,
        "include_stop_str_in_output": True,
        "priority": 3,
        "truncate_prompt_tokens": 50,
        "user": "u1",
        "best_of": 2,
    }
    req = CompletionRequest.model_validate(body)
    kw = req.to_sampling_params(default_max_tokens=100)
    assert kw["stop"] == ["END"]
    assert kw["logit_bias"] == {5: 200.0, 7: -1.0}
    assert kw["logprobs"] == 3 and kw["prompt_logprobs"] == 3  # echo + logprobs -> prompt logprobs
    assert req.priority == 3 and req.prompts() == [[1, 2, 3]]
    sp = SamplingParams(**kw)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (0.5, 0.9, 40, 0.05)
    assert (sp.n, sp.best_of, sp.seed, sp.max_tokens, sp.min_tokens) == (2, 2, 1234, 7, 2)
    assert sp.logit_bias == {5: 100.0, 7: -1.0}  # SamplingParams clamps to [-100, 100]
    assert sp.stop_token_ids == [9, 10] and sp.ignore_eos and sp.include_stop_str_in_output
    assert sp.truncate_prompt_tokens == 50 and not sp.skip_special_tokens


def test_default_max_tokens_and_model_defaults() -> None:
    req = CompletionRequest.model_validate({"prompt": "x", "max_tokens": None, "top_p": 0.5})
    defaults = {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "max_tokens": 500}
    kw = req.to_sampling_params(default_max_tokens=64, default_sampling_params=defaults)
    assert kw["max_tokens"] == 64  # the model's default is capped by what fits
    assert kw["temperature"] == 0.7 and kw["top_k"] == 20  # unset -> model default
    assert kw["top_p"] == 0.5  # set by the request -> request wins
    kw = req.to_sampling_params(default_max_tokens=1000, default_sampling_params=defaults)
    assert kw["max_tokens"] == 500
    with pytest.raises(OpenAIError) as info:
        req.to_sampling_params(default_max_tokens=0)
    assert info.value.param == "max_tokens"


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([5, 6], [[5, 6]]),
        ([[5], [6, 7]], [[5], [6, 7]]),
    ],
)
def test_prompt_shapes(prompt: Any, expected: list[Any]) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == expected


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [-1], 5, {"a": 1}, [[1], [-2]], [True]])
def test_bad_prompts_name_prompt(prompt: Any) -> None:
    err = _bad(CompletionRequest, {"prompt": prompt})
    assert err.param == "prompt"
    assert "prompt" in err.message


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("temperature", -0.1, "greater than or equal to 0"),
        ("top_p", 0.0, "greater than 0"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("n", 0, "greater than or equal to 1"),
        ("n", 1000, "less than or equal to 128"),
        ("max_tokens", 0, "greater than or equal to 1"),
        ("frequency_penalty", 2.5, "less than or equal to 2"),
        ("presence_penalty", -3, "greater than or equal to -2"),
        ("top_k", -2, "greater than or equal to -1"),
        ("min_p", 1.5, "less than or equal to 1"),
        ("repetition_penalty", 0, "greater than 0"),
        ("logprobs", -1, "greater than or equal to 0"),
        ("seed", 2**64, "less than or equal to"),
        ("min_tokens", -1, "greater than or equal to 0"),
        ("stop_token_ids", [-1], "greater than or equal to 0"),
        ("temperature", "hot", "valid number"),
        ("stop", ["ok", ""], "empty"),
        ("stop", 5, "string"),
        ("logit_bias", {"abc": 1.0}, "token ids"),
    ],
)
def test_out_of_range_is_400_naming_the_field(field: str, value: Any, fragment: str) -> None:
    err = _bad(CompletionRequest, {"prompt": "x", field: value})
    assert err.param is not None and err.param.split(".")[0] == field
    assert field in err.message and fragment in err.message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"suffix": "tail"}, "suffix"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
        ({"n": 2, "best_of": 3}, "best_of"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ],
)
def test_cross_field_rules(body: dict[str, Any], param: str) -> None:
    assert _bad(CompletionRequest, {"prompt": "x", **body}).param == param


def test_missing_prompt_and_unknown_fields() -> None:
    err = _bad(CompletionRequest, {"model": "m"})
    assert err.param == "prompt" and "required" in err.message
    req = CompletionRequest.model_validate({"prompt": "x", "no_such_knob": 3})
    assert not hasattr(req, "no_such_knob")


def test_stream_options_include_usage() -> None:
    req = CompletionRequest.model_validate(
        {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    )
    assert req.include_usage and req.is_streaming
    assert not CompletionRequest.model_validate({"prompt": "x", "stream": True}).include_usage


# ---------------------------------------------------------------------------- chat


def test_chat_content_parts_and_template_messages() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
                {"role": "tool", "content": "42", "tool_call_id": "1"},
            ],
        }
    )
    msgs = req.messages_for_template()
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[1] == {"role": "user", "content": "a\nb"}
    assert msgs[2]["content"] == "" and msgs[2]["tool_calls"] == [{"id": "1", "type": "function"}]
    assert msgs[3] == {"role": "tool", "content": "42", "tool_call_id": "1"}


def test_chat_max_tokens_and_logprobs() -> None:
    req = ChatCompletionRequest.model_validate({"messages": CHAT})
    kw = req.to_sampling_params(default_max_tokens=77)
    assert kw["max_tokens"] == 77 and "logprobs" not in kw
    req = ChatCompletionRequest.model_validate(
        {"messages": CHAT, "max_tokens": 10, "max_completion_tokens": 20, "logprobs": True, "top_logprobs": 5}
    )
    kw = req.to_sampling_params(default_max_tokens=77)
    assert kw["max_tokens"] == 20 and kw["logprobs"] == 5
    kw = ChatCompletionRequest.model_validate({"messages": CHAT, "logprobs": True}).to_sampling_params(10)
    assert kw["logprobs"] == 0  # only the chosen token's logprob
    SamplingParams(**kw)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
            "messages.[0].content",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.[0].content"),
        ({"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": CHAT, "top_logprobs": -1, "logprobs": True}, "top_logprobs"),
        ({"messages": CHAT, "continue_final_message": True}, "continue_final_message"),
        ({"messages": CHAT, "continue_final_message": True, "add_generation_prompt": False}, "messages"),
        ({"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
        (
            {
                "messages": CHAT,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"messages": CHAT, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"messages": CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
        ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ],
)
def test_chat_validation(body: dict[str, Any], param: str) -> None:
    assert _bad(ChatCompletionRequest, body).param == param


def test_chat_tools_and_extras_pass_through() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    req = ChatCompletionRequest.model_validate(
        {
            "messages": CHAT,
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_object"},
            "chat_template_kwargs": {"enable_thinking": False},
        }
    )
    assert req.tools_for_template() == tools
    assert req.chat_template_kwargs == {"enable_thinking": False}
    assert (
        ChatCompletionRequest.model_validate(
            {"messages": CHAT, "tools": tools, "tool_choice": "none"}
        ).tools_for_template()
        is None
    )


def test_tokenize_detokenize_requests() -> None:
    t = TokenizeCompletionRequest.model_validate({"prompt": "hi"})
    assert t.add_special_tokens
    c = TokenizeChatRequest.model_validate({"messages": CHAT})
    assert c.add_generation_prompt and not c.add_special_tokens
    assert _bad(DetokenizeRequest, {"tokens": [1, -5]}).param == "tokens.[1]"


# ---------------------------------------------------------------------------- responses


def test_response_shapes() -> None:
    usage = UsageInfo(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    resp = CompletionResponse(
        model="m", choices=[CompletionResponseChoice(index=0, text="ok", finish_reason="stop")], usage=usage
    )
    d = json.loads(resp.model_dump_json())
    assert d["object"] == "text_completion" and d["id"].startswith("cmpl-")
    assert d["choices"][0] == {
        "index": 0, "text": "ok", "logprobs": None, "finish_reason": "stop", "stop_reason": None, "prompt_logprobs": None,
        "prompt_token_ids": None, "token_ids": None,  # vLLM's return_token_ids fields, null unless asked
    }  # fmt: skip
    chat = ChatCompletionResponse(
        model="m",
        choices=[ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content="hey"))],
        usage=usage,
    )
    d = json.loads(chat.model_dump_json())
    assert d["object"] == "chat.completion" and d["choices"][0]["message"]["content"] == "hey"
    cards = ModelList(data=[ModelCard(id="m", max_model_len=128)])
    assert json.loads(cards.model_dump_json())["data"][0]["object"] == "model"


def test_stream_delta_omits_unset_fields() -> None:
    first = ChatCompletionStreamResponse(
        model="m",
        choices=[
            ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))
        ],
    )
    nxt = ChatCompletionStreamResponse(
        id=first.id,
        model="m",
        choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content="He"))],
    )
    event = sse_event(nxt)
    assert event.startswith("data: ") and event.endswith("\n\n")
    d = json.loads(event[len("data: ") :])
    assert d["object"] == "chat.completion.chunk" and d["id"] == first.id
    assert d["choices"][0]["delta"] == {"content": "He"}
    assert d["choices"][0]["finish_reason"] is None
    assert json.loads(first.model_dump_json())["choices"][0]["delta"] == {"role": "assistant", "content": ""}


# ---------------------------------------------------------------------------- FastAPI handlers


def _app() -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict[str, Any]:
        if req.model == "missing":
            raise model_not_found(req.model)
        if req.model == "bug":
            raise RuntimeError("internal detail that must not leak")
        return {"max_tokens": req.to_sampling_params(16)["max_tokens"]}

    return app


def test_handlers_map_errors_to_openai_shape() -> None:
    client = TestClient(_app(), raise_server_exceptions=False)
    ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json() == {"max_tokens": 3}

    bad = client.post("/v1/completions", json={"prompt": "x", "temperature": -1})
    assert bad.status_code == 400  # not FastAPI's 422
    body = ErrorResponse.model_validate(bad.json())
    assert body.error.param == "temperature" and body.error.type == "invalid_request_error"
    assert body.error.code == 400

    bad_json = client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]

    missing = client.post("/v1/completions", json={"prompt": "x", "model": "missing"})
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "The model `missing` does not exist.", "type": "NotFoundError", "param": "model", "code": 404,
    }  # fmt: skip

    bug = client.post("/v1/completions", json={"prompt": "x", "model": "bug"})
    assert bug.status_code == 500 and "internal detail" not in bug.text
    assert bug.json()["error"]["type"] == "server_error"

    route = client.get("/v1/nothing-here")
    assert route.status_code == 404 and "error" in route.json()
