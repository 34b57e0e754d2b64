"""Server-side behaviour behind the vLLM compatibility flags (vllm_compat_args.py):

    ChatOptions      --response-role, --chat-template-content-format, --enable-auto-tool-choice /
                     --tool-call-parser, --reasoning-parser (read by serving_chat.py)
    RequestLogger    --enable-log-requests / --max-log-len: one INFO line per request
    StatsLogger      periodic engine stats line unless --disable-log-stats (vLLM's LoggingStatLogger)
    --middleware     imported and added to the app
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from pagedserve.core.stats import SchedulerStats
from pagedserve.entrypoints.openai.chat_output import ChoiceOutput
from pagedserve.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from pagedserve.entrypoints.openai.tool_parsers import get_tool_parser
from pagedserve.entrypoints.openai.vllm_compat_args import import_middleware

logger = logging.getLogger("pagedserve.api_server")
stats_logger = logging.getLogger("pagedserve.stats")
_EXTRA_KEY = "vllm_compat"


@dataclass(slots=True)
class ChatOptions:
    response_role: str = "assistant"
    content_format: str = "auto"  # "auto" | "string" | "openai"
    tool_parser: str | None = None  # set only with --enable-auto-tool-choice
    reasoning_parser: str | None = None
    request_logger: RequestLogger | None = None

    def choice_output(self, auto_tools: bool) -> ChoiceOutput | None:
        """A fresh per-choice parser, or None when the reply is plain content."""
        tools = get_tool_parser(self.tool_parser)() if auto_tools and self.tool_parser else None
        reasoning = get_reasoning_parser(self.reasoning_parser)() if self.reasoning_parser else None
        if tools is None and reasoning is None:
            return None
        return ChoiceOutput(tools, reasoning)

    @property
    def tools_need_special_tokens(self) -> bool:
        return self.tool_parser is not None and get_tool_parser(self.tool_parser)().needs_special_tokens


def chat_options(state: Any) -> ChatOptions:
    """The server's options (defaults for a ServerState built without install_vllm_compat)."""
    options = state.extra.get(_EXTRA_KEY)
    return options if isinstance(options, ChatOptions) else ChatOptions()


class RequestLogger:
    """vLLM's "Received request" line: prompt and token ids cut to --max-log-len."""

    def __init__(self, max_log_len: int | None) -> None:
        self.max_log_len = max_log_len

    def log(self, request_id: str, prompt: str | None, token_ids: list[int] | None, params: Any) -> None:
        n = self.max_log_len
        if n is not None:
            prompt = prompt[:n] if prompt is not None else None
            token_ids = token_ids[:n] if token_ids is not None else None
        logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
                    request_id, prompt, params, token_ids)  # fmt: skip


def log_request(state: Any, request_id: str, prompt: str | None, token_ids: list[int] | None, params: Any) -> None:
    request_logger = chat_options(state).request_logger
    if request_logger is not None:
        request_logger.log(request_id, prompt, token_ids, params)


class StatsLogger:
    """One line every `interval` seconds while the engine reports steps: throughput since the last
    line, queue sizes, KV cache use and prefix cache hit rate (vLLM's fields)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: float | None = None  # None: the first report logs at once
        self._tokens = 0
        self._queries = self._hits = 0

    def on_stats(self, s: SchedulerStats) -> None:
        self._tokens += s.num_scheduled_tokens
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval:
            return
        elapsed = now - self._last if self._last is not None else 0.0
        dq, dh = s.prefix_cache_queries - self._queries, s.prefix_cache_hits - self._hits
        stats_logger.info(
            "Engine: throughput %.1f tokens/s, Running: %d reqs, Swapped: %d reqs, Waiting: %d reqs, "
            "KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            self._tokens / elapsed if elapsed else 0.0, s.num_running, s.num_swapped, s.num_waiting,
            100 * s.kv_cache_usage, 100 * dh / dq if dq > 0 else 0.0,
        )  # fmt: skip
        self._last, self._tokens = now, 0
        self._queries, self._hits = s.prefix_cache_queries, s.prefix_cache_hits


def stats_interval() -> float:
    text = os.environ.get("PAGEDSERVE_LOG_STATS_INTERVAL") or os.environ.get("VLLM_LOG_STATS_INTERVAL") or "10"
    try:
        return max(0.0, float(text))
    except ValueError:
        return 10.0


def install_vllm_compat(app: FastAPI, args: argparse.Namespace, state: Any) -> None:
    """Chat options and the request logger into `state`, --middleware into `app`."""
    state.extra[_EXTRA_KEY] = ChatOptions(
        response_role=getattr(args, "response_role", "assistant"),
        content_format=getattr(args, "chat_template_content_format", "auto"),
        tool_parser=args.tool_call_parser if getattr(args, "enable_auto_tool_choice", False) else None,
        reasoning_parser=getattr(args, "reasoning_parser", None),
        request_logger=RequestLogger(getattr(args, "max_log_len", None))
        if getattr(args, "enable_log_requests", False) else None,
    )  # fmt: skip
    for path in getattr(args, "middleware", None) or []:
        middleware = import_middleware(path)
        if inspect.isclass(middleware):
            app.add_middleware(middleware)  # type: ignore[arg-type]  # an ASGI class taking `app`
        elif inspect.iscoroutinefunction(middleware):
            app.middleware("http")(middleware)
        else:
            raise ValueError(f"--middleware {path}: expected an ASGI middleware class or an async function")


def on_engine_ready(args: argparse.Namespace, engine: Any) -> None:
    if not getattr(args, "disable_log_stats", False):
        engine.stats_listeners.append(StatsLogger(stats_interval()).on_stats)


# ---------------------------------------------------------------------------- content format


@functools.lru_cache(maxsize=32)
def detect_content_format(template: str | None) -> str:
    """"openai" when the template loops over a message's content (it expects a list of parts),
    else "string" (vLLM's auto detection, on the template's Jinja syntax tree)."""
    if not template:
        return "string"
    import jinja2
    from jinja2 import nodes

    try:
        tree = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"

    def is_content(node: nodes.Node) -> bool:
        if isinstance(node, nodes.Getitem):
            return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
        if isinstance(node, nodes.Getattr):
            return node.attr == "content"
        return isinstance(node, nodes.Name) and node.name == "content"

    for loop in tree.find_all(nodes.For):
        if is_content(loop.iter):
            return "openai"
    return "string"


def content_format_for(options: ChatOptions, template: str | None) -> str:
    if options.content_format != "auto":
        return options.content_format
    return detect_content_format(template)
