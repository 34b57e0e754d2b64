"""De-identification of one request's texts, and re-identification of what the model answers.

    Deidentifier(mode)            one per request, in the HTTP process only (never sent anywhere)
      .redact(text) -> text       identifiers -> typed placeholders <PHONE_1>, <EMAIL_1>, ...;
                                  the same value gets the same placeholder in every text of the request
      .restore(text) -> text      "reversible": placeholders of this request -> their values
      .stream_restorer()          restore() for a text that arrives in pieces (stream deltas)

Modes: "mask" (placeholders stay in the response), "reversible" (the response is re-identified for
the caller). The mapping lives in this object only: it is not logged, audited, or passed to the
engine, and is dropped with the request. A placeholder number that already appears in the input
is skipped, so the caller's own "<PHONE_1>" text is never re-identified as someone's phone number.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Literal

from pagedserve.ops.deid.recognizers import Recognizer, default_recognizers, find_identifiers, mrn_recognizer

DeidMode = Literal["mask", "reversible"]
DEID_MODES: tuple[str, ...] = ("mask", "reversible")
_PLACEHOLDER = re.compile(r"<([A-Z][A-Z_]*)_([1-9][0-9]*)>")
# The longest text that may still grow into a placeholder ("<" + type + "_" + digits).
_MAX_PLACEHOLDER_CHARS = 32
_PARTIAL = re.compile(r"<[A-Z_]*[0-9]*$")


def recognizers_for(mrn_patterns: Iterable[str] = ()) -> list[Recognizer]:
    """The default recognizers with a tenant's MRN patterns first (they are the most specific).
    The list is shared between requests (compiled once per pattern set): do not change it."""
    return _recognizers(tuple(mrn_patterns))


@functools.lru_cache(maxsize=64)
def _recognizers(mrn_patterns: tuple[str, ...]) -> list[Recognizer]:
    return [mrn_recognizer(p) for p in mrn_patterns] + default_recognizers()


class Deidentifier:
    def __init__(self, mode: DeidMode, recognizers: list[Recognizer] | None = None) -> None:
        if mode not in DEID_MODES:
            raise ValueError(f"deidentify must be one of {list(DEID_MODES)}, got {mode!r}")
        self.mode = mode
        self.recognizers = recognizers if recognizers is not None else default_recognizers()
        self._by_value: dict[tuple[str, str], str] = {}  # (entity, value) -> placeholder
        self._values: dict[str, str] = {}  # placeholder -> value
        self._next: dict[str, int] = {}  # entity -> last number given
        self._taken: set[str] = set()  # placeholders spelled in the input itself
        self.counts: dict[str, int] = {}  # entity -> findings replaced (for metrics; no values)

    def redact(self, text: str) -> str:
        self._taken.update(m.group(0) for m in _PLACEHOLDER.finditer(text))
        findings = find_identifiers(text, self.recognizers)
        if not findings:
            return text
        out: list[str] = []
        pos = 0
        for f in findings:
            out.append(text[pos : f.start])
            out.append(self._placeholder(f.entity, text[f.start : f.end]))
            self.counts[f.entity] = self.counts.get(f.entity, 0) + 1
            pos = f.end
        out.append(text[pos:])
        return "".join(out)

    def _placeholder(self, entity: str, value: str) -> str:
        key = (entity, value)
        found = self._by_value.get(key)
        if found is not None:
            return found
        n = self._next.get(entity, 0)
        while True:
            n += 1
            name = f"<{entity}_{n}>"
            if name not in self._taken:
                break
        self._next[entity] = n
        self._by_value[key] = name
        self._values[name] = value
        return name

    @property
    def num_replaced(self) -> int:
        return sum(self.counts.values())

    @property
    def reversible(self) -> bool:
        return self.mode == "reversible"

    def restore(self, text: str) -> str:
        """The text with this request's placeholders replaced by their values ("reversible"
        mode; in "mask" mode the text unchanged)."""
        if not self.reversible or not self._values or "<" not in text:
            return text
        return _PLACEHOLDER.sub(lambda m: self._values.get(m.group(0), m.group(0)), text)

    def stream_restorer(self) -> StreamRestorer:
        return StreamRestorer(self)


class StreamRestorer:
    """restore() over a text split into deltas: a delta's tail that may be the start of a
    placeholder ("<PHO") is held back until the next delta decides it (or the stream ends)."""

    def __init__(self, deid: Deidentifier) -> None:
        self.deid = deid
        self._held = ""

    def feed(self, delta: str, final: bool = False) -> str:
        text = self._held + delta
        self._held = ""
        if not final and self.deid.reversible:
            cut = text.rfind("<")
            if cut >= 0 and len(text) - cut <= _MAX_PLACEHOLDER_CHARS and _PARTIAL.fullmatch(text, cut):
                text, self._held = text[:cut], text[cut:]
        return self.deid.restore(text)
