"""A server with generation-config defaults: unset knobs take them; structured outputs
(response_format, guided_*) and forced tool calls on top (as vLLM)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import RunningServer, start_server


@pytest.fixture(scope="module")
def defaults_server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("generation_config_server")
    overrides = json.dumps({"temperature": 0.0, "max_new_tokens": 7})
    with start_server(tiny_checkpoints["llama"], tmp, extra=["--override-generation-config", overrides]) as server:
        yield server


def test_unset_knobs_take_the_generation_config(defaults_server: RunningServer) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "the model runs"}], "ignore_eos": True}
    with httpx.Client(base_url=defaults_server.v1, timeout=60) as http:
        first, second = (http.post("/chat/completions", json=chat).json() for _ in range(2))
        # temperature 0 from the config: the same greedy answer twice; max_tokens 7 from it too
        assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
        assert first["usage"]["completion_tokens"] == 7
        # what a request sets wins over the defaults
        explicit = http.post("/chat/completions", json={**chat, "max_tokens": 3}).json()
        assert explicit["usage"]["completion_tokens"] == 3
        sampled = {http.post("/chat/completions", json={**chat, "temperature": 1.5, "seed": s})
                   .json()["choices"][0]["message"]["content"] for s in range(4)}
        assert len(sampled) > 1


def test_bad_override_is_refused_at_start(tiny_checkpoints: Any, tmp_path: Any) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pagedserve.entrypoints.openai.api_server", "--model", tiny_checkpoints["llama"],
         "--override-generation-config", "[1, 2]"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "must be a JSON object" in proc.stderr


def test_response_format_and_guided_fields(defaults_server: RunningServer) -> None:
    """Structured outputs over HTTP: response_format json_schema / json_object, vLLM's guided_*
    fields; bad specs are 400s naming the field, and the server keeps serving."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "answer"}], "max_tokens": 200,
            "temperature": 1.0, "seed": 1}
    with httpx.Client(base_url=defaults_server.v1, timeout=60) as http:
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        r = http.post("/chat/completions", json={**chat, "response_format": fmt})
        assert r.status_code == 200, r.text
        assert set(json.loads(r.json()["choices"][0]["message"]["content"], strict=False)) == {"ok"}
        r = http.post("/chat/completions", json={**chat, "response_format": {"type": "json_object"}})
        choice = r.json()["choices"][0]
        text = choice["message"]["content"]
        # a random model may run out of tokens inside a free-form object: then a prefix of one
        assert text.lstrip().startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text, strict=False), dict)
        r = http.post("/completions", json={"model": "tiny", "prompt": "pick", "guided_choice": ["red", "blue"],
                                            "max_tokens": 10})
        assert r.json()["choices"][0]["text"] in ("red", "blue")
        r = http.post("/completions", json={"model": "tiny", "prompt": "n", "guided_regex": r"[0-9]{3}",
                                            "max_tokens": 10, "temperature": 1.0})
        assert len(r.json()["choices"][0]["text"]) == 3 and r.json()["choices"][0]["text"].isdigit()
        bad = [
            ({**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
            ({**chat, "guided_regex": "(open"}, "invalid structured output regex"),
            ({**chat, "guided_json": {"type": "object", "properties": 5}}, "invalid structured output json"),
            ({**chat, "guided_regex": "a", "guided_choice": ["a"]}, "exactly one of"),
            ({**chat, "structured_outputs": {"bogus": 1}}, "unknown structured_outputs"),
        ]
        for body, needle in bad:
            r = http.post("/chat/completions", json=body)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert http.post("/chat/completions", json=chat).status_code == 200


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                          "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}},
        "required": ["zone"], "additionalProperties": False}}}


def test_forced_tool_calls(defaults_server: RunningServer) -> None:
    """tool_choice naming a function or "required": the reply is tool_calls whose arguments follow
    the functions' parameter schemas (streamed too), through the official SDK."""
    import openai

    c = openai.OpenAI(base_url=defaults_server.v1, api_key="x")
    messages = [{"role": "user", "content": "weather in paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                  tool_choice=named, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments, strict=False)) == {"city"}
    # streamed: the arguments arrive as deltas of one call and concatenate to the same JSON
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                            tool_choice=named, max_tokens=200, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    # "required": a JSON array of calls, returned as tool_calls with finish_reason tool_calls
    r = c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                  tool_choice="required", max_tokens=220, temperature=0.8, seed=2)
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls and {t.function.name for t in choice.message.tool_calls} <= {"get_weather", "get_time"}
        for t in choice.message.tool_calls:
            json.loads(t.function.arguments)
    else:  # cut off by max_tokens: the partial array comes back as content
        assert choice.finish_reason == "length" and (choice.message.content or "").lstrip().startswith("[")
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice=named,
                                  response_format={"type": "json_object"})
