"""Pythonic format (Llama 3.2/4, ToolACE): the reply is a Python list of calls with keyword
arguments, optionally wrapped in <|python_start|> ... <|python_end|>:

    [get_weather(city="Paris", unit="celsius"), get_time(tz="CET")]

Parsed with `ast` (values through ast.literal_eval: literals only, never eval). A call's arguments
are only known once the call is closed (and a call with a non-literal argument is no call at
all), so a streamed call is sent, name then arguments as JSON, once its closing parenthesis arrives.
"""

from __future__ import annotations

import ast
import json

from pagedserve.entrypoints.openai.tool_parsers.base import PartialCall, Scan, ToolParser, register

START, END = "<|python_start|>", "<|python_end|>"


def _call_of(node: ast.expr) -> PartialCall | None:
    """A PartialCall for `name(k=literal, ...)`; None for anything else (positional arguments,
    non-literal values)."""
    if not isinstance(node, ast.Call) or node.args:
        return None
    parts: list[str] = []
    func: ast.expr = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(func.id)
    args: dict[str, object] = {}
    for kw in node.keywords:
        if kw.arg is None:
            return None
        try:
            args[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return PartialCall(name=".".join(reversed(parts)), arguments=json.dumps(args, ensure_ascii=False),
                       complete=True)  # fmt: skip


def _parse_list(source: str) -> list[PartialCall] | None:
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree.body, ast.List):
        return None
    calls = [_call_of(e) for e in tree.body.elts]
    if any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


@register
class PythonicToolParser(ToolParser):
    name = "pythonic"

    def scan(self, text: str, final: bool) -> Scan:
        body = text.strip()
        if body.startswith(START):
            body = body[len(START):].removesuffix(END).strip()
            if not final and not body:
                return Scan()
        elif not final and (not body or START.startswith(body)):
            return Scan()  # undecided
        if not body.startswith("["):
            return Scan(content=text)
        whole = _parse_list(body)
        if whole is not None:
            return Scan(calls=whole)
        if final:
            return Scan(content=text)
        # Open list: the longest prefix that closes into a list of complete calls.
        calls: list[PartialCall] = []
        for i in range(len(body) - 1, 0, -1):  # the largest cut wins: it holds every earlier call
            if body[i] == ")":
                parsed = _parse_list(body[: i + 1] + "]")
                if parsed is not None:
                    calls = parsed
                    break
        return Scan(calls=calls)
