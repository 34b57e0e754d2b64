"""Tool calls of a chat reply whose tool_choice forces them (a named function, or "required").

The reply is constrained by structured outputs (ChatCompletionRequest._structured_outputs):
  named function  -> the reply IS the call's arguments (a JSON object of its parameters schema);
  "required"      -> the reply is a JSON array of {"name": ..., "parameters": {...}} calls.
Here the reply text becomes OpenAI `tool_calls`, whole (non-streamed) or as deltas (streamed:
the named call's arguments stream as they come; "required" calls are sent once the array is done,
since a call's name is only known once its object is complete).
"""

from __future__ import annotations

import json

from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest, random_id
from pagedserve.entrypoints.openai.responses import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)


def forces_tool_calls(request: ChatCompletionRequest) -> bool:
    return request.forced_tool is not None or request.tools_required


def parse_tool_calls(request: ChatCompletionRequest, text: str) -> list[ToolCall] | None:
    """The calls in a finished reply; None when the text is not a complete call (e.g. cut off by
    max_tokens), in which case the caller returns it as plain content."""
    forced = request.forced_tool
    if forced is not None:
        return [ToolCall(function=FunctionCall(name=forced.function.name, arguments=text))]
    try:
        items = json.loads(text, strict=False)
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        return None
    return [ToolCall(function=FunctionCall(name=str(i["name"]), arguments=json.dumps(i.get("parameters", {}))))
            for i in items]


def finish_reason(request: ChatCompletionRequest, reason: str | None, parsed: bool) -> str | None:
    """OpenAI: "tool_calls" when the model chose to call ("required"); a forced named function
    finishes with "stop"."""
    if parsed and reason == "stop" and request.tools_required:
        return "tool_calls"
    return reason


class ToolCallStream:
    """Deltas of one choice's tool calls while its text streams in."""

    def __init__(self, request: ChatCompletionRequest) -> None:
        self.request = request
        self.text = ""
        self.call_id = random_id("chatcmpl-tool")  # the id ToolCall gives a whole call
        self.started = False
        self.parsed = False

    def delta(self, text: str, finished: bool) -> DeltaMessage | None:
        self.text += text
        forced = self.request.forced_tool
        if forced is not None:
            self.parsed = True
            if not text and self.started:
                return None
            if not self.started:
                self.started = True
                return DeltaMessage(tool_calls=[DeltaToolCall(
                    index=0, id=self.call_id, type="function",
                    function=DeltaFunctionCall(name=forced.function.name, arguments=text))])
            return DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))])
        if not finished:
            return None
        calls = parse_tool_calls(self.request, self.text)
        if calls is None:
            return DeltaMessage(content=self.text)
        self.parsed = True
        return DeltaMessage(tool_calls=[
            DeltaToolCall(index=i, id=c.id, type="function",
                          function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
            for i, c in enumerate(calls)])
