"""Structured-output specs over HTTP: a pathological one (a 100,000-value enum) is a 400 when its
compile passes the deadline, while other requests complete meanwhile; specs past a size limit
are 400s naming the field; compile errors name the field the spec came from, in the user's terms
(no xgrammar, no source paths, no Python class names); the server keeps serving."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import RunningServer, start_server

pytest.importorskip("xgrammar")

TIMEOUT_S = 15
FLAGS = ["--max-structured-output-spec-bytes", "3000000", "--max-structured-output-choices", "200000",
         "--max-structured-output-depth", "40", "--structured-output-compile-timeout", str(TIMEOUT_S),
         "--structured-output-compile-workers", "2"]
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "answer"}], "max_tokens": 20}
# what an error message for a client must never contain
LEAKS = re.compile(r"xgrammar|/project|\.cc\b|\.py\b|Check failed|Traceback|[A-Z][a-z]+(?:Error|Exception)\b"
                   r"|StructuredOutputsParams|CompiledGrammar|GrammarCompiler")


@pytest.fixture(scope="module")
def server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(tiny_checkpoints["llama"], tmp_path_factory.mktemp("structured_limits"), extra=FLAGS) as s:
        yield s


def _assert_clean_400(r: httpx.Response, param: str, needle: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert needle in error["message"], error
    assert not LEAKS.search(error["message"]), error


def test_pathological_grammar_is_a_400_while_other_requests_complete(server: RunningServer) -> None:
    huge = {"type": "string", "enum": [f"value-{i}" for i in range(100_000)]}  # ~1.5 MB, within the limits

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.v1, timeout=300) as http:
            # both compile workers up (their start-up is not part of any deadline)
            warm = await asyncio.gather(
                http.post("/chat/completions", json={**CHAT, "guided_choice": ["a", "b"]}),
                http.post("/chat/completions", json={**CHAT, "guided_regex": "[0-9]{2}"}))
            assert [r.status_code for r in warm] == [200, 200]
            order: list[str] = []

            async def post(name: str, path: str, body: dict[str, Any]) -> httpx.Response:
                r = await http.post(path, json=body)
                order.append(name)
                return r

            pathological = asyncio.create_task(post("huge", "/chat/completions", {**CHAT, "guided_json": huge}))
            await asyncio.sleep(0.5)  # let it be sent first (ordering of sends, not a timing assert)
            good = await asyncio.gather(
                post("plain", "/chat/completions", {**CHAT, "max_tokens": 5}),
                post("choice", "/chat/completions", {**CHAT, "guided_choice": ["yes", "no"]}),
                post("regex", "/completions", {"model": "tiny", "prompt": "n", "guided_regex": "[a-c]{3}",
                                               "max_tokens": 10}),
                post("cached", "/chat/completions", {**CHAT, "guided_choice": ["a", "b"]}))
            assert [r.status_code for r in good] == [200] * 4, [r.text for r in good]
            assert good[1].json()["choices"][0]["message"]["content"] in ("yes", "no")
            assert re.fullmatch("[a-c]{3}", good[2].json()["choices"][0]["text"])
            r = await pathological
            # every good request finished while the pathological one was still compiling
            assert order.index("huge") == len(order) - 1, order
            _assert_clean_400(r, "guided_json", f"the schema is too complex to compile within {TIMEOUT_S} s")
            # its worker was killed and replaced: structured requests still work
            after = await http.post("/chat/completions", json={**CHAT, "guided_choice": ["up", "down"]})
            assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] in ("up", "down")

    asyncio.run(run())


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


def test_size_limits_are_400s_naming_the_field(server: RunningServer) -> None:
    weather = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": _nested(45)}}}}
    cases = [
        ({**CHAT, "guided_grammar": "root ::= " + " | ".join(f'"w{i}"' for i in range(400_000))},
         "guided_grammar", "more than this server's limit of 3000000 bytes"),
        ({**CHAT, "structured_outputs": {"choice": [f"c{i}" for i in range(200_001)]}},
         "structured_outputs.choice", "200001 choices, more than this server's limit of 200000"),
        ({**CHAT, "guided_json": {"type": "string", "enum": [f"v{i}" for i in range(150_000)] + ["x"] * 60_000}},
         "guided_json", "lists 210000 enum values"),
        ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": _nested(45)}}},
         "response_format", "nests 46 levels deep, more than this server's limit of 40"),
        ({**CHAT, "tools": [weather], "tool_choice": {"type": "function", "function": {"name": "f"}}},
         "tools", "levels deep"),
    ]
    with httpx.Client(base_url=server.v1, timeout=120) as http:
        for body, param, needle in cases:
            _assert_clean_400(http.post("/chat/completions", json=body), param, needle)
        assert http.post("/chat/completions", json=CHAT).status_code == 200


def test_compile_errors_name_the_field_in_the_users_terms(server: RunningServer) -> None:
    bad_schema = {"type": "object", "properties": 5}
    tool = {"type": "function", "function": {"name": "f", "parameters": bad_schema}}
    cases = [
        ("/chat/completions", {**CHAT, "response_format": {"type": "json_schema",
                                                          "json_schema": {"name": "n", "schema": bad_schema}}},
         "response_format", "JSON schema is invalid: properties must be an object."),
        ("/chat/completions", {**CHAT, "guided_json": '{"type": "strin"}'}, "guided_json", 'Unsupported type "strin"'),
        ("/chat/completions", {**CHAT, "guided_json": '{"type": '}, "guided_json", "is not valid JSON"),
        ("/chat/completions", {**CHAT, "structured_outputs": {"json": bad_schema}}, "structured_outputs.json",
         "JSON schema is invalid"),
        ("/chat/completions", {**CHAT, "structured_outputs": {"regex": "(x"}}, "structured_outputs.regex",
         "regular expression is invalid: Regex parsing error at position"),
        ("/chat/completions", {**CHAT, "guided_grammar": "root ::= missing"}, "guided_grammar",
         'grammar is invalid: EBNF parser error at line 1, column 10: Rule "missing" is not defined.'),
        ("/chat/completions", {**CHAT, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}}},
         "tools", "JSON schema is invalid"),
        ("/chat/completions", {**CHAT, "stream": True, "guided_regex": "(x"}, "guided_regex", "regular expression"),
        ("/completions", {"model": "tiny", "prompt": ["a", "b"], "guided_regex": "a{2,1}"}, "guided_regex",
         "regular expression is invalid"),
    ]
    with httpx.Client(base_url=server.v1, timeout=120) as http:
        for path, body, param, needle in cases:
            _assert_clean_400(http.post(path, json=body), param, needle)
        assert http.post("/chat/completions", json={**CHAT, "guided_regex": "[0-9]{2}"}).status_code == 200
