"""Hermes / Qwen2.5 / Qwen3 / SmolLM2 format: content, then one or more

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

from pagedserve.entrypoints.openai.tool_parsers.base import (
    Scan,
    ToolParser,
    held_back,
    register,
    scan_call_object,
)

START, END = "<tool_call>", "</tool_call>"


@register
class HermesToolParser(ToolParser):
    name = "hermes"

    def scan(self, text: str, final: bool) -> Scan:
        first = text.find(START)
        if first < 0:
            keep = 0 if final else held_back(text, START)
            return Scan(content=text[: len(text) - keep])
        scan = Scan(content=text[:first])
        pos = first
        while pos >= 0:
            call, end = scan_call_object(text, pos + len(START))
            scan.calls.append(call)
            if end is None:
                break
            pos = text.find(START, end)
        return scan
