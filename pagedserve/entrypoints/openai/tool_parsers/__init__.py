"""Tool-call parsers for `tool_choice: "auto"` (vLLM's --tool-call-parser names). Importing the
package registers every format."""

from pagedserve.entrypoints.openai.tool_parsers import hermes, llama3_json, mistral, pythonic
from pagedserve.entrypoints.openai.tool_parsers.base import (
    ExtractedToolCalls,
    ToolParser,
    get_tool_parser,
    tool_parser_names,
)

__all__ = [
    "ExtractedToolCalls",
    "ToolParser",
    "get_tool_parser",
    "tool_parser_names",
    "hermes",
    "llama3_json",
    "mistral",
    "pythonic",
]
