"""Mistral format: content, then [TOOL_CALLS] and a JSON array of calls

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]

or (tokenizer v11+) one `name[ARGS]{...}` per call: [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}.
[TOOL_CALLS] is a special token, so the server keeps special tokens in the detokenized text.
"""

from __future__ import annotations

import json
import re

from pagedserve.entrypoints.openai.tool_parsers.base import (
    PartialCall,
    Scan,
    ToolParser,
    held_back,
    register,
    scan_call_object,
    skip_ws,
)

BOT, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_DECODER = json.JSONDecoder(strict=False)


@register
class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True

    def scan(self, text: str, final: bool) -> Scan:
        first = text.find(BOT)
        if first < 0:
            keep = 0 if final else held_back(text, BOT)
            return Scan(content=text[: len(text) - keep])
        scan = Scan(content=text[:first])
        pos = skip_ws(text, first + len(BOT))
        if pos < len(text) and text[pos] == "[":
            self._scan_array(text, pos + 1, scan)
        else:
            self._scan_named(text, pos, scan)
        return scan

    @staticmethod
    def _scan_array(text: str, pos: int, scan: Scan) -> None:
        while True:
            pos = skip_ws(text, pos)
            if pos >= len(text) or text[pos] == "]":
                return
            call, end = scan_call_object(text, pos)
            scan.calls.append(call)
            if end is None:
                return
            pos = skip_ws(text, end)
            if pos < len(text) and text[pos] == ",":
                pos += 1

    @staticmethod
    def _scan_named(text: str, pos: int, scan: Scan) -> None:
        while pos < len(text):
            m = _NAME.match(text, pos)
            if m is None:
                return
            args_at = text.find(ARGS, m.end())
            if args_at != m.end():
                return  # the name is not finished yet (or not this format)
            call = PartialCall(name=m.group())
            scan.calls.append(call)
            start = skip_ws(text, args_at + len(ARGS))
            if start >= len(text):
                return
            try:
                _, end = _DECODER.raw_decode(text, start)
            except json.JSONDecodeError:
                call.arguments = text[start:] if text[start] == "{" else None
                return
            call.arguments, call.complete = text[start:end], True
            pos = skip_ws(text, end)
            if text.startswith(BOT, pos):
                pos = skip_ws(text, pos + len(BOT))
