"""Post-check of constrained outputs: does the text the caller gets match its JSON schema or regex?

xgrammar enforces the constraint while decoding, so a complete output always matches; what the
check catches is an output cut short (max_tokens, a stop string, an abort: truncated JSON) or a
constraint the grammar could only approximate. The result goes into the response and the
compliance metric (tenant_metrics.py).

    check_for(spec) -> OutputCheck | None    None: no constraint, or one without a post-check (EBNF)
    OutputCheck.check(text) -> error | None
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from pagedserve.sampling_params import StructuredOutputsParams


@dataclass(slots=True)
class OutputCheck:
    kind: str  # "json_schema" | "json_object" | "regex" | "choice"
    validator: Any = None  # jsonschema validator, compiled regex, or the choices

    def check(self, text: str) -> str | None:
        """None when the text matches; otherwise what is wrong (no output text is quoted)."""
        if self.kind == "regex":
            return None if self.validator.fullmatch(text) else "the output does not match the required regex"
        if self.kind == "choice":
            return None if text in self.validator else "the output is not one of the allowed choices"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return f"the output is not valid JSON ({e.msg} at character {e.pos})"
        if self.kind == "json_object":
            return None if isinstance(value, dict) else "the output is not a JSON object"
        error = next(iter(self.validator.iter_errors(value)), None)
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"the output does not match the JSON schema at {where}: {error.validator} constraint"


def check_for(spec: StructuredOutputsParams | None) -> OutputCheck | None:
    if spec is None:
        return None
    if spec.json is not None:
        try:  # a spec that does not parse is the grammar compiler's 400, not ours
            schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
        except ValueError:
            return None
        if not isinstance(schema, (dict, bool)):
            return None
        try:
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
        except jsonschema.SchemaError:  # xgrammar's 400 names it (compile_grammar)
            return None
        return OutputCheck("json_schema", cls(schema))
    if spec.json_object:
        return OutputCheck("json_object")
    if spec.regex is not None:
        try:
            return OutputCheck("regex", re.compile(spec.regex, re.DOTALL))
        except re.error:  # a syntax xgrammar takes and Python does not: no post-check
            return None
    if spec.choice is not None:
        return OutputCheck("choice", frozenset(spec.choice))
    return None  # EBNF grammars: xgrammar's own acceptance is the only check


@dataclass(slots=True)
class Validation:
    """One choice's post-check result, as the response carries it."""

    valid: bool
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"valid": self.valid, "error": self.error}
