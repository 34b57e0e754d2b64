"""Tool-call and reasoning parsers on scripted model outputs: whole text, and streamed in random
chunkings (the deltas must reassemble to exactly the whole-text result)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pagedserve.entrypoints.openai.chat_output import ChoiceOutput
from pagedserve.entrypoints.openai.reasoning_parsers import get_reasoning_parser, reasoning_parser_names
from pagedserve.entrypoints.openai.tool_parsers import get_tool_parser, tool_parser_names

WEATHER = {"city": "Paris", "unit": "celsius", "days": [1, 2], "nested": {"k": "a}b\"c"}}
TIME = {"tz": "CET"}

# (parser, model output, expected content, expected [(name, arguments object)])
CASES: list[tuple[str, str, str | None, list[tuple[str, dict[str, Any]]]]] = [
    ("hermes", 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(WEATHER)
     + '}\n</tool_call>', "Let me check.", [("get_weather", WEATHER)]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(WEATHER) + '}\n</tool_call>\n'
     '<tool_call>\n{"arguments": {"tz": "CET"}, "name": "get_time"}\n</tool_call>', None,
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("hermes", "No tools needed: 3 < 4 and <tool is not a tag.", "No tools needed: 3 < 4 and <tool is not a tag.", []),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>', None,
     [("get_time", TIME)]),  # arguments as a JSON string
    ("llama3_json", '{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + '}', None,
     [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": ' + json.dumps(WEATHER)
     + '}; {"name": "get_time", "arguments": {"tz": "CET"}}', None, [("get_weather", WEATHER), ("get_time", TIME)]),
    ("llama3_json", "The weather is {sunny}.", "The weather is {sunny}.", []),
    ("mistral", 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": ' + json.dumps(WEATHER)
     + '}, {"name": "get_time", "arguments": {"tz": "CET"}}]', "Sure. ", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]" + json.dumps(WEATHER) + '[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}', None,
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("mistral", "Plain [answer] with [TOOL brackets.", "Plain [answer] with [TOOL brackets.", []),
    ("pythonic", '[get_weather(city="Paris", unit="celsius", days=[1, 2], nested={"k": "a}b\\"c"}), get_time(tz="CET")]',
     None, [("get_weather", WEATHER), ("get_time", TIME)]),
    ("pythonic", '<|python_start|>[get_time(tz="CET")]<|python_end|>', None, [("get_time", TIME)]),
    ("pythonic", "[1] is a citation, not a call.", "[1] is a citation, not a call.", []),
    ("pythonic", '[get_time(tz=__import__("os").getcwd())]', '[get_time(tz=__import__("os").getcwd())]', []),
]


def _chunks(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 5, 8, 13])
        out.append(text[i : i + n])
        i += n
    return out


def _stream(parser_name: str | None, reasoning_name: str | None, text: str, rng: random.Random) -> dict[str, Any]:
    """Stream `text` through a ChoiceOutput; reassemble content, reasoning and calls as a client does."""
    choice = ChoiceOutput(get_tool_parser(parser_name)() if parser_name else None,
                          get_reasoning_parser(reasoning_name)() if reasoning_name else None)
    pieces = _chunks(text, rng)
    content, reasoning = "", ""
    calls: dict[int, dict[str, Any]] = {}
    for k, piece in enumerate(pieces):
        delta = choice.delta(piece, finished=k == len(pieces) - 1)
        if delta is None:
            continue
        content += delta.content or ""
        assert delta.reasoning == delta.reasoning_content
        reasoning += delta.reasoning_content or ""
        for tc in delta.tool_calls:
            if tc.index not in calls:
                assert tc.index == len(calls) and tc.id and tc.type == "function"
                assert tc.function is not None and tc.function.name  # the name comes first
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function is not None and tc.function.name is None
            calls[tc.index]["arguments"] += (tc.function.arguments or "") if tc.function else ""
    return {"content": content or None, "reasoning": reasoning or None,
            "calls": [calls[i] for i in range(len(calls))], "tools_called": choice.tools_called}


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_tool_parser_whole_and_streamed(parser: str, text: str, content: str | None,
                                        calls: list[tuple[str, dict[str, Any]]]) -> None:  # fmt: skip
    result = get_tool_parser(parser)().extract(text)
    assert result.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in result.tool_calls] == calls
    assert len({c.id for c in result.tool_calls}) == len(calls)
    for seed in range(25):
        streamed = _stream(parser, None, text, random.Random(seed))
        assert streamed["tools_called"] == bool(calls)
        assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == [
            (c.function.name, c.function.arguments) for c in result.tool_calls]
        assert streamed["content"] == (content if calls else text)


def test_streamed_content_comes_before_the_call_and_args_grow() -> None:
    parser = get_tool_parser("hermes")()
    text = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    deltas = [parser.extract_streaming(text[:i], text[i]) for i in range(len(text))]
    sent = [d for d in deltas if d is not None]
    assert "".join(d.content or "" for d in sent) == "Checking."
    first_call = next(i for i, d in enumerate(sent) if d.tool_calls)
    assert all(not d.content for d in sent[first_call:])
    arg_deltas = [tc.function.arguments for d in sent for tc in d.tool_calls if tc.function and tc.function.arguments]
    assert len(arg_deltas) > 5  # arguments really stream, piece by piece
    assert "".join(arg_deltas) == '{"city": "Paris"}'


def test_cut_off_call() -> None:
    """A reply cut off inside a call is content as a whole; streamed, the call has started (its
    name and arguments so far were sent, as vLLM) and nothing more is sent at the end."""
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": '
    result = get_tool_parser("hermes")().extract(text)
    assert result.content == text and not result.tools_called
    streamed = _stream("hermes", None, text, random.Random(0))
    assert streamed["content"] is None
    assert streamed["calls"][0]["name"] == "get_weather" and streamed["calls"][0]["arguments"] == '{"city": '


def test_pythonic_never_evaluates() -> None:
    result = get_tool_parser("pythonic")().extract('[f(x=open("/etc/passwd").read())]')
    assert not result.tools_called


def test_unknown_parser_names() -> None:
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(tool_parser_names())
    assert {"deepseek_r1", "qwen3"} <= set(reasoning_parser_names())
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'; known: hermes"):
        get_tool_parser("nope")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        get_reasoning_parser("nope")


REASONING_CASES = [
    ("deepseek_r1", "<think>First, 2+2.</think>The answer is 4.", "First, 2+2.", "The answer is 4."),
    ("deepseek_r1", "I think it is 4 </thin and more.</think>\n\n4", "I think it is 4 </thin and more.", "\n\n4"),
    ("deepseek_r1", "Still thinking when cut off <", "Still thinking when cut off <", None),
    ("qwen3", "<think>\nhmm\n</think>\n\nHello.", "\nhmm\n", "\n\nHello."),
    ("qwen3", "Hello, no thinking <think> here.", None, "Hello, no thinking <think> here."),
    ("qwen3", "<think>cut off", "cut off", None),
]


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), REASONING_CASES)
def test_reasoning_parser_whole_and_streamed(name: str, text: str, reasoning: str | None, content: str | None) -> None:
    assert get_reasoning_parser(name)().extract(text) == (reasoning, content)
    for seed in range(25):
        streamed = _stream(None, name, text, random.Random(seed))
        assert (streamed["reasoning"], streamed["content"]) == (reasoning, content)


def test_reasoning_then_tool_call() -> None:
    text = '<think>The user wants weather.</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    message = ChoiceOutput(get_tool_parser("hermes")(), get_reasoning_parser("qwen3")()).whole("assistant", text)
    assert message.reasoning_content == message.reasoning == "The user wants weather."
    assert message.content == "\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    for seed in range(10):
        streamed = _stream("hermes", "qwen3", text, random.Random(seed))
        assert streamed["reasoning"] == "The user wants weather."
        assert streamed["content"] == "\n"
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"]] == [("get_weather", {"city": "Paris"})]
