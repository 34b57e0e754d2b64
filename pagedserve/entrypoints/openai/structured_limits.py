"""Limits on structured-output specs, checked on the HTTP process before anything compiles, and
the one compile of a request's spec (off the event loop, under a deadline): every failure is a
400 that names the request field the spec came from, in the user's terms.

    spec text bytes  > --max-structured-output-spec-bytes    -> 400 (nothing parsed)
    JSON nesting     > --max-structured-output-depth          -> 400 (json schemas)
    enum values / choices > --max-structured-output-choices   -> 400 (all enum lists summed)
    compile          > --structured-output-compile-timeout    -> 400 "too complex to compile within N s"
    compile error                                             -> 400 with xgrammar's reason, cleaned
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from typing import Any

from pagedserve.entrypoints.arg_types import positive_int as _positive_int
from pagedserve.entrypoints.openai.errors import BadRequestError, ServiceUnavailableError
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.structured_output import KIND_NAMES, GrammarError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StructuredOutputLimits:
    max_spec_bytes: int = 128 << 10
    max_choices: int = 2048  # enum values of a schema (summed over its enums), or choices
    max_depth: int = 64  # nesting of the schema's JSON objects and arrays
    compile_timeout_s: float = 10.0
    compile_workers: int = 2
    cache_entries: int = 256


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_structured_output_args(parser: argparse.ArgumentParser) -> None:
    d = StructuredOutputLimits()
    group = parser.add_argument_group("structured outputs (response_format, guided_*, structured_outputs)")
    group.add_argument("--max-structured-output-spec-bytes", type=_positive_int, default=d.max_spec_bytes,
                       help="largest schema / regex / grammar / choice list accepted, in bytes (a larger one is a 400)")
    group.add_argument("--max-structured-output-choices", type=_positive_int, default=d.max_choices,
                       help="most enum values (summed over a schema) or guided_choice entries (more is a 400)")
    group.add_argument("--max-structured-output-depth", type=_positive_int, default=d.max_depth,
                       help="deepest nesting of a JSON schema's objects and arrays (deeper is a 400)")
    group.add_argument("--structured-output-compile-timeout", type=_positive_float, default=d.compile_timeout_s,
                       help="seconds a spec may take to compile; a slower one is a 400 and its compile is killed")
    group.add_argument("--structured-output-compile-workers", type=_positive_int, default=d.compile_workers,
                       help="processes that compile specs (started on the first structured request)")
    group.add_argument("--structured-output-cache-size", type=_positive_int, default=d.cache_entries,
                       help="compiled specs kept (LRU, by spec hash): an identical spec compiles once")


def limits_from_args(args: argparse.Namespace) -> StructuredOutputLimits:
    d = StructuredOutputLimits()
    return StructuredOutputLimits(
        max_spec_bytes=getattr(args, "max_structured_output_spec_bytes", d.max_spec_bytes),
        max_choices=getattr(args, "max_structured_output_choices", d.max_choices),
        max_depth=getattr(args, "max_structured_output_depth", d.max_depth),
        compile_timeout_s=getattr(args, "structured_output_compile_timeout", d.compile_timeout_s),
        compile_workers=getattr(args, "structured_output_compile_workers", d.compile_workers),
        cache_entries=getattr(args, "structured_output_cache_size", d.cache_entries),
    )


def _shape(value: Any) -> tuple[int, int]:
    """(nesting depth, enum values summed over every "enum" list) of a parsed JSON schema;
    iterative, so a deep spec cannot exhaust the stack."""
    depth = enum_values = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            depth = max(depth, level)
            enum = node.get("enum")
            if isinstance(enum, list):
                enum_values += len(enum)
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in node)
    return depth, enum_values


def check_limits(spec: StructuredOutputsParams, limits: StructuredOutputLimits, param: str) -> None:
    """BadRequestError naming `param` when the spec passes a limit (cheap: no compile)."""
    kind, text = spec.key
    what = KIND_NAMES[kind]
    size = len(text.encode())
    if size > limits.max_spec_bytes:
        raise BadRequestError(f"{param}: the {what} is {size} bytes, more than this server's limit of "
                              f"{limits.max_spec_bytes} bytes.", param=param)
    if kind == "choice" and spec.choice is not None and len(spec.choice) > limits.max_choices:
        raise BadRequestError(f"{param}: {len(spec.choice)} choices, more than this server's limit of "
                              f"{limits.max_choices}.", param=param)
    if kind != "json":
        return
    try:
        schema = json.loads(text)
    except RecursionError:
        raise BadRequestError(f"{param}: the JSON schema nests too deep.", param=param) from None
    except ValueError as e:
        raise BadRequestError(f"{param}: the JSON schema is not valid JSON ({e}).", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise BadRequestError(f"{param}: a JSON schema must be an object.", param=param)
    depth, enum_values = _shape(schema)
    if depth > limits.max_depth:
        raise BadRequestError(f"{param}: the JSON schema nests {depth} levels deep, more than this server's "
                              f"limit of {limits.max_depth}.", param=param)
    if enum_values > limits.max_choices:
        raise BadRequestError(f"{param}: the JSON schema lists {enum_values} enum values, more than this "
                              f"server's limit of {limits.max_choices}.", param=param)


async def compile_request_grammar(engine: Any, spec: StructuredOutputsParams | None,
                                  limits: StructuredOutputLimits, param: str) -> str | None:
    """The serialized grammar of a request's spec (None without one): limits first, then one
    compile in the engine's grammar service; every failure a 400 naming `param`."""
    if spec is None:
        return None
    check_limits(spec, limits, param)
    service = engine.grammar_service(limits.compile_workers, limits.cache_entries)
    try:
        serialized: str = await service.compile(spec, limits.compile_timeout_s)
    except GrammarError as e:
        raise BadRequestError(f"{param}: {e}", param=param) from None
    except Exception:  # noqa: BLE001 - e.g. a compile worker that cannot start: the server's fault
        logger.exception("structured output compile failed")
        raise ServiceUnavailableError("Structured outputs are unavailable right now; retry later.") from None
    return serialized
