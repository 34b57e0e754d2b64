"""Automatic tool calls (`--enable-auto-tool-choice --tool-call-parser NAME`): the base parser.

A format's parser only says what the text generated so far contains (`scan`):

    content        the text before the tool-call markup (a prefix of the output that only grows)
    calls[i].name  the i-th call's function name, once it is complete
    calls[i].arguments  the arguments JSON known so far; only ever grows by appending, or stays
                   None until the whole value is known (formats whose arguments are not JSON text)

The base class turns that into whole results (`extract`) and into OpenAI stream deltas
(`extract_streaming`, `finish_streaming`) by sending only what is new since the last call: content
first, then per call index one delta with id/type/name, then argument deltas. Because scans only
grow, the deltas of a stream concatenate to exactly what `extract` returns for the full text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from pagedserve.entrypoints.openai.protocol import random_id
from pagedserve.entrypoints.openai.responses import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)

ARGUMENT_KEYS = ("arguments", "parameters")
_DECODER = json.JSONDecoder(strict=False)


@dataclass(slots=True)
class PartialCall:
    name: str | None = None
    arguments: str | None = None  # JSON text; grows by appending only
    complete: bool = False


@dataclass(slots=True)
class Scan:
    content: str = ""
    calls: list[PartialCall] = field(default_factory=list)


@dataclass(slots=True)
class ExtractedToolCalls:
    content: str | None
    tool_calls: list[ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


class ToolParser:
    """One choice's parser: stateful while streaming (what has been sent so far)."""

    name: ClassVar[str] = ""
    # Whether the format's markers are special tokens that detokenization must keep.
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self) -> None:
        self._sent_content = ""
        self._sent: list[tuple[str, str]] = []  # per started call: (id, arguments sent)

    # ------------------------------------------------------------------ format-specific
    def scan(self, text: str, final: bool) -> Scan:
        """What `text` holds; `final` says no more text follows (nothing may be held back)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ whole text
    def extract(self, text: str) -> ExtractedToolCalls:
        scan = self.scan(text, final=True)
        calls = [c for c in scan.calls if c.complete and c.name is not None and c.arguments is not None]
        if not calls:
            return ExtractedToolCalls(content=text, tool_calls=[])
        return ExtractedToolCalls(
            content=scan.content or None,
            tool_calls=[ToolCall(function=FunctionCall(name=c.name or "", arguments=c.arguments or ""))
                        for c in calls],
        )  # fmt: skip

    # ------------------------------------------------------------------ streaming
    @property
    def tools_called(self) -> bool:
        return bool(self._sent)

    def extract_streaming(self, previous_text: str, delta_text: str) -> DeltaMessage | None:
        """The delta that `delta_text` (appended to `previous_text`) adds; None when nothing new
        can be sent yet (e.g. a possible start of the markup is held back)."""
        return self._diff(self.scan(previous_text + delta_text, final=False))

    def finish_streaming(self, full_text: str) -> DeltaMessage | None:
        """The last delta once generation ended: what was held back, so that the stream matches
        `extract(full_text)` (a markup that never became a valid call is sent as content)."""
        result = self.extract(full_text)
        if not result.tool_calls:  # a call already started stays a (broken) call, as vLLM
            return self._diff(self.scan(full_text, final=False) if self._sent else Scan(content=full_text))
        scan = Scan(content=self._sent_content,
                    calls=[PartialCall(c.function.name, c.function.arguments, True) for c in result.tool_calls])
        return self._diff(scan)

    def _diff(self, scan: Scan) -> DeltaMessage | None:
        content: str | None = None
        if len(scan.content) > len(self._sent_content) and scan.content.startswith(self._sent_content):
            content = scan.content[len(self._sent_content):]
            self._sent_content = scan.content
        deltas: list[DeltaToolCall] = []
        for i, call in enumerate(scan.calls):
            if i == len(self._sent):
                if call.name is None:
                    break
                call_id = random_id("chatcmpl-tool")
                self._sent.append((call_id, ""))
                deltas.append(DeltaToolCall(index=i, id=call_id, type="function",
                                            function=DeltaFunctionCall(name=call.name)))  # fmt: skip
            call_id, sent_args = self._sent[i]
            args = call.arguments
            if args is not None and len(args) > len(sent_args) and args.startswith(sent_args):
                self._sent[i] = (call_id, args)
                deltas.append(DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=args[len(sent_args):])))
        if content is None and not deltas:
            return None
        return DeltaMessage(content=content, tool_calls=deltas)


# ---------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[ToolParser]] = {}


def register(cls: type[ToolParser]) -> type[ToolParser]:
    _REGISTRY[cls.name] = cls
    return cls


def tool_parser_names() -> list[str]:
    return sorted(_REGISTRY)


def get_tool_parser(name: str) -> Callable[[], ToolParser]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(tool_parser_names())}") from None


# ---------------------------------------------------------------------------- shared scanning helpers


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it might be
    the start of the marker, so it is not sent as content yet)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def scan_call_object(text: str, pos: int) -> tuple[PartialCall, int | None]:
    """Scan the JSON object `{"name": ..., "arguments"|"parameters": {...}}` starting at text[pos]
    (after whitespace). Returns the call known so far and the index after its closing brace (None
    while incomplete or invalid). An argument object's text is the raw JSON text the model wrote:
    while it is open, everything after its start belongs to it, so the text only grows."""
    call = PartialCall()
    i = skip_ws(text, pos)
    if i >= len(text) or text[i] != "{":
        return call, None
    i += 1
    while True:
        i = skip_ws(text, i)
        if i >= len(text):
            return call, None
        if text[i] == "}":
            call.complete = call.name is not None
            if call.complete and call.arguments is None:
                call.arguments = "{}"
            return call, i + 1
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return call, None
        try:
            key, i = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            return call, None
        i = skip_ws(text, i)
        if i >= len(text) or text[i] != ":":
            return call, None
        i = skip_ws(text, i + 1)
        if i >= len(text):
            return call, None
        is_args = key in ARGUMENT_KEYS and call.arguments is None
        if is_args and text[i] == "{":
            try:
                _, end = _DECODER.raw_decode(text, i)
            except json.JSONDecodeError:
                call.arguments = text[i:]  # open: all of the rest is the arguments so far
                return call, None
            call.arguments = text[i:end]
            i = end
            continue
        try:
            value, i = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            return call, None
        if key == "name" and isinstance(value, str):
            call.name = value
        elif is_args:  # arguments given as a JSON string holding the object (some models)
            call.arguments = value if isinstance(value, str) else json.dumps(value)
