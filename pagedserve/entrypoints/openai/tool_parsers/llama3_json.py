"""Llama 3.x JSON format: the reply is the call(s) themselves, optionally after <|python_tag|>,
several separated by ';':

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ..., "parameters": ...}

A reply that does not start with '{' (or the tag) is plain content.
"""

from __future__ import annotations

from pagedserve.entrypoints.openai.tool_parsers.base import (
    Scan,
    ToolParser,
    register,
    scan_call_object,
    skip_ws,
)

TAG = "<|python_tag|>"


@register
class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def scan(self, text: str, final: bool) -> Scan:
        start = skip_ws(text, 0)
        rest = text[start:]
        if rest.startswith(TAG):
            start = skip_ws(text, start + len(TAG))
        elif not final and (not rest or TAG.startswith(rest)):
            return Scan()  # undecided: could still become a call
        if start < len(text) and text[start] != "{" or start >= len(text) and final:
            return Scan(content=text)
        scan = Scan()
        pos = start
        while pos < len(text):
            call, end = scan_call_object(text, pos)
            scan.calls.append(call)
            if end is None:
                break
            pos = skip_ws(text, end)
            if pos < len(text) and text[pos] == ";":
                pos = skip_ws(text, pos + 1)
            elif pos < len(text):
                break  # trailing text that is not another call: ignored, as vLLM
        return scan
