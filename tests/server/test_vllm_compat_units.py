"""Units behind the vLLM compatibility flags: chat-template content format, request logging."""

from __future__ import annotations

import logging

import pytest

from pagedserve.core.stats import SchedulerStats
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.vllm_compat import (
    ChatOptions,
    RequestLogger,
    StatsLogger,
    content_format_for,
    detect_content_format,
)
from pagedserve.testing.checkpoints import CHAT_TEMPLATE

LOOPS = "{% for m in messages %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endfor %}"
LOOPS_ATTR = "{% for m in messages %}{% for part in m.content %}{{ part.text }}{% endfor %}{% endfor %}"
STRING = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize(("template", "fmt"), [
    (LOOPS, "openai"), (LOOPS_ATTR, "openai"), (CHAT_TEMPLATE, "openai"), (STRING, "string"),
    (None, "string"), ("{% for x in %}", "string"),
])  # fmt: skip
def test_detect_content_format(template: str | None, fmt: str) -> None:
    assert detect_content_format(template) == fmt
    assert content_format_for(ChatOptions(content_format="auto"), template) == fmt
    assert content_format_for(ChatOptions(content_format="string"), template) == "string"


def test_messages_for_template_formats() -> None:
    request = ChatCompletionRequest(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
    ])  # fmt: skip
    assert [m["content"] for m in request.messages_for_template("string")] == ["be brief", "a\nb", ""]
    assert [m["content"] for m in request.messages_for_template("openai")] == [
        [{"type": "text", "text": "be brief"}], [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], ""]


def test_request_logger_truncates(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pagedserve.api_server"):
        RequestLogger(5).log("r1", "abcdefghij", list(range(10)), "SamplingParams(n=1)")
        RequestLogger(None).log("r2", "abcdefghij", [1, 2], "p")
    first, second = (r.getMessage() for r in caplog.records)
    assert first == "Received request r1: prompt: 'abcde', params: SamplingParams(n=1), prompt_token_ids: [0, 1, 2, 3, 4]"
    assert "prompt: 'abcdefghij'" in second


def test_stats_logger_interval(caplog: pytest.LogCaptureFixture) -> None:
    stats = SchedulerStats(num_running=2, num_waiting=1, num_swapped=0, kv_cache_usage=0.25,
                           prefix_cache_queries=100, prefix_cache_hits=40, num_preemptions=0,
                           num_scheduled_tokens=7, kv_slots_allocated=0, kv_slots_wasted=0)  # fmt: skip
    logger = StatsLogger(interval=3600.0)
    with caplog.at_level(logging.INFO, logger="pagedserve.stats"):
        logger.on_stats(stats)  # the first report logs at once
        logger.on_stats(stats)  # within the interval: nothing
    [record] = caplog.records
    assert "Running: 2 reqs, Swapped: 0 reqs, Waiting: 1 reqs, KV cache usage: 25.0%, " \
           "Prefix cache hit rate: 40.0%" in record.getMessage()
