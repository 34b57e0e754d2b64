"""Reasoning parsers (`--reasoning-parser NAME`): the text a model writes inside
<think> ... </think> goes to the message's `reasoning_content` (and vLLM's newer `reasoning`
alias), the rest is the content.

    deepseek_r1  the chat template opens <think> in the prompt, so the reply usually starts inside
                 it: everything up to </think> is reasoning (a leading <think> is dropped); a reply
                 without </think> is all reasoning (it was cut off while thinking).
    qwen3        reasoning only when the reply starts with <think> (Qwen3 with enable_thinking=False
                 writes none); a reply cut off before </think> is all reasoning, streamed or not.

As the tool parsers, a parser reports what the text so far splits into (two strings that only
grow) and the base class sends what is new; a possible start of a tag is held back until known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pagedserve.entrypoints.openai.tool_parsers.base import held_back

START, END = "<think>", "</think>"


@dataclass(slots=True)
class ReasoningSplit:
    reasoning: str
    content: str


class ReasoningParser:
    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self._sent_reasoning = ""
        self._sent_content = ""

    def split(self, text: str, final: bool) -> ReasoningSplit:
        raise NotImplementedError

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole reply; None for an empty part."""
        s = self.split(text, final=True)
        return s.reasoning or None, s.content or None

    def extract_streaming(self, previous_text: str, delta_text: str) -> tuple[str, str]:
        """(reasoning delta, content delta) that `delta_text` adds (either may be "")."""
        return self._diff(self.split(previous_text + delta_text, final=False))

    def finish_streaming(self, full_text: str) -> tuple[str, str]:
        return self._diff(self.split(full_text, final=True))

    def _diff(self, s: ReasoningSplit) -> tuple[str, str]:
        r = c = ""
        if s.reasoning.startswith(self._sent_reasoning):
            r, self._sent_reasoning = s.reasoning[len(self._sent_reasoning):], s.reasoning
        if s.content.startswith(self._sent_content):
            c, self._sent_content = s.content[len(self._sent_content):], s.content
        return r, c


def _inside(body: str, final: bool) -> ReasoningSplit:
    """`body` starts inside the reasoning: up to </think> is reasoning, after it content."""
    end = body.find(END)
    if end >= 0:
        return ReasoningSplit(body[:end], body[end + len(END):])
    keep = 0 if final else held_back(body, END)
    return ReasoningSplit(body[: len(body) - keep], "")


_REGISTRY: dict[str, type[ReasoningParser]] = {}


def _register(cls: type[ReasoningParser]) -> type[ReasoningParser]:
    _REGISTRY[cls.name] = cls
    return cls


@_register
class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"

    def split(self, text: str, final: bool) -> ReasoningSplit:
        if text.startswith(START):
            return _inside(text[len(START):], final)
        if not final and START.startswith(text):
            return ReasoningSplit("", "")  # might still be the opening tag
        return _inside(text, final)


@_register
class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"

    def split(self, text: str, final: bool) -> ReasoningSplit:
        body = text.lstrip()
        if body.startswith(START):
            return _inside(body[len(START):], final)
        if not final and START.startswith(body):
            return ReasoningSplit("", "")
        return ReasoningSplit("", text)


def reasoning_parser_names() -> list[str]:
    return sorted(_REGISTRY)


def get_reasoning_parser(name: str) -> Callable[[], ReasoningParser]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown reasoning parser {name!r}; known: {', '.join(reasoning_parser_names())}") from None
