"""One chat choice's reply text -> reasoning, content and automatic tool calls.

    generated text --reasoning parser--> reasoning | content --tool parser--> content | tool_calls

Either parser may be absent. `whole()` splits a finished reply; `delta()` is fed the streamed text
piece by piece and returns the OpenAI delta to send (None when nothing can be sent yet).
"""

from __future__ import annotations

from pagedserve.entrypoints.openai.reasoning_parsers import ReasoningParser
from pagedserve.entrypoints.openai.responses import ChatMessage, DeltaMessage
from pagedserve.entrypoints.openai.tool_parsers import ToolParser


class ChoiceOutput:
    def __init__(self, tools: ToolParser | None, reasoning: ReasoningParser | None) -> None:
        self.tools = tools
        self.reasoning = reasoning
        self._text = ""  # all generated text so far
        self._content = ""  # the content part of it so far (what the tool parser has seen)
        self.tools_called = False

    def whole(self, role: str, text: str) -> ChatMessage:
        reasoning, content = (None, text) if self.reasoning is None else self.reasoning.extract(text)
        message = ChatMessage(role=role, content=content, reasoning_content=reasoning, reasoning=reasoning)
        if self.tools is not None:
            result = self.tools.extract(content or "")
            if result.tools_called:
                self.tools_called = True
                message.content, message.tool_calls = result.content, result.tool_calls
        return message

    def delta(self, text: str, finished: bool) -> DeltaMessage | None:
        previous, self._text = self._text, self._text + text
        reasoning, content = "", text
        if self.reasoning is not None:
            if finished:
                reasoning, content = self.reasoning.finish_streaming(self._text)
            else:
                reasoning, content = self.reasoning.extract_streaming(previous, text)
        delta = DeltaMessage(reasoning_content=reasoning or None, reasoning=reasoning or None)
        if self.tools is None:
            delta.content = content or None
        else:
            before, self._content = self._content, self._content + content
            part = self.tools.finish_streaming(self._content) if finished else (
                self.tools.extract_streaming(before, content) if content else None)
            if part is not None:
                delta.content, delta.tool_calls = part.content, part.tool_calls
            self.tools_called = self.tools.tools_called
        if delta.content is None and delta.reasoning_content is None and not delta.tool_calls:
            return None
        return delta
