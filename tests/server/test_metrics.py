"""Prometheus metrics: vLLM's exposition names, labels, bucket edges, values; per-instance registries."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.ops.metrics import TTFT_BUCKETS, EngineMetrics, HTTPMetricsMiddleware, build_1_2_5_buckets


def _samples(m: EngineMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(m: EngineMetrics, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": m.model_name, **labels}.items())))
    return _samples(m)[key]


# The series vLLM's /metrics shows (counters with `_total`, as prometheus-client writes them).
EXPECTED_SERIES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_requests_swapped",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:iteration_tokens_total_bucket",
    "vllm:iteration_tokens_total_count",
]


def test_exposition_names_and_labels() -> None:
    m = EngineMetrics("tiny-llama")
    text = m.render().decode()
    names = {name for name, _ in _samples(m)}
    for series in EXPECTED_SERIES:
        assert series in names, series
    assert "vllm:prompt_tokens_total_total" not in text
    assert 'model_name="tiny-llama"' in text
    for reason in ("stop", "length", "abort"):  # present at 0 before any request, as vLLM
        assert _value(m, "vllm:request_success_total", finished_reason=reason) == 0.0


def test_scheduler_stats_and_iterations() -> None:
    m = EngineMetrics("m")
    m.record_scheduler_stats(
        3, 2, 1, 0.25, prefix_queries_delta=100, prefix_hits_delta=40, preemptions_delta=1
    )
    m.record_scheduler_stats(4, 0, 0, 0.5, prefix_queries_delta=10, prefix_hits_delta=10, preemptions_delta=0)
    assert _value(m, "vllm:num_requests_running") == 4
    assert _value(m, "vllm:num_requests_waiting") == 0
    assert _value(m, "vllm:kv_cache_usage_perc") == 0.5
    assert _value(m, "vllm:prefix_cache_queries_total") == 110  # counters accumulate deltas
    assert _value(m, "vllm:prefix_cache_hits_total") == 50
    assert _value(m, "vllm:num_preemptions_total") == 1
    for n in (1, 8, 9, 5000):
        m.record_iteration(n)
    assert _value(m, "vllm:iteration_tokens_total_count") == 4
    assert _value(m, "vllm:iteration_tokens_total_sum") == 5018
    assert _value(m, "vllm:iteration_tokens_total_bucket", le="8.0") == 2
    assert _value(m, "vllm:iteration_tokens_total_bucket", le="16.0") == 3
    assert _value(m, "vllm:iteration_tokens_total_bucket", le="+Inf") == 4


def test_request_finished() -> None:
    m = EngineMetrics("m", max_model_len=100)
    m.record_request_finished("stop", 12, 5, ttft=0.03, tpot=0.02, e2e=0.2, queue_time=0.01)
    m.record_request_finished("length", 8, 16, ttft=0.5, tpot=0.1, e2e=3.0, queue_time=None)
    m.record_request_finished("abort", 4, 0, ttft=None, tpot=None, e2e=0.1, queue_time=0.1)
    assert _value(m, "vllm:request_success_total", finished_reason="stop") == 1
    assert _value(m, "vllm:request_success_total", finished_reason="length") == 1
    assert _value(m, "vllm:request_success_total", finished_reason="abort") == 1
    assert _value(m, "vllm:prompt_tokens_total") == 24
    assert _value(m, "vllm:generation_tokens_total") == 21
    assert _value(m, "vllm:time_to_first_token_seconds_count") == 2
    assert _value(m, "vllm:time_to_first_token_seconds_bucket", le="0.04") == 1
    assert _value(m, "vllm:time_per_output_token_seconds_count") == 2
    assert _value(m, "vllm:e2e_request_latency_seconds_bucket", le="0.3") == 2
    assert _value(m, "vllm:request_queue_time_seconds_count") == 2
    assert _value(m, "vllm:request_prompt_tokens_bucket", le="10.0") == 2
    assert _value(m, "vllm:request_generation_tokens_bucket", le="20.0") == 3


def test_bucket_edges_match_vllm() -> None:
    m = EngineMetrics("m")
    les = sorted(
        float(dict(labels)["le"])
        for name, labels in _samples(m)
        if name == "vllm:time_to_first_token_seconds_bucket"
    )
    assert les == [*TTFT_BUCKETS, float("inf")]
    assert TTFT_BUCKETS[:3] == (0.001, 0.005, 0.01) and TTFT_BUCKETS[-1] == 2560.0
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(1) == [1]


def test_registries_are_independent() -> None:
    a, b = EngineMetrics("a"), EngineMetrics("b")  # would raise "Duplicated timeseries" if shared
    a.record_iteration(5)
    assert _value(a, "vllm:iteration_tokens_total_count") == 1
    assert _value(b, "vllm:iteration_tokens_total_count") == 0
    assert 'model_name="a"' not in b.render().decode()


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda m: m.record_scheduler_stats(1, 1, 0, 1.5, 0, 0, 0), "kv_usage"),
        (lambda m: m.record_scheduler_stats(-1, 1, 0, 0.5, 0, 0, 0), "running"),
        (lambda m: m.record_scheduler_stats(1, 1, 0, 0.5, -3, 0, 0), "prefix_queries_delta"),
        (lambda m: m.record_scheduler_stats(1, 1, 0, 0.5, 1, 2, 0), "prefix_hits_delta"),
        (lambda m: m.record_iteration(-1), "num_tokens"),
        (lambda m: m.record_request_finished("timeout", 1, 1, 0.1, 0.1, 1.0, 0.1), "finished_reason"),
        (lambda m: m.record_request_finished("stop", -1, 1, 0.1, 0.1, 1.0, 0.1), "prompt_tokens"),
    ],
)
def test_bad_values_raise(call: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        call(EngineMetrics("m"))


def test_http_middleware_counts_route_templates() -> None:
    m = EngineMetrics("m")
    app = FastAPI()

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, str]:
        return {"id": name}

    @app.get("/metrics")
    async def metrics() -> str:
        return "x"

    app.add_middleware(HTTPMetricsMiddleware, metrics=m)
    client = TestClient(app)
    client.get("/v1/models/a")
    client.get("/v1/models/b")
    client.get("/random/scanner/path")
    client.get("/metrics")  # not counted: scrapes would dominate
    key = {"handler": "/v1/models/{name}", "method": "GET"}
    assert _value(m, "http_requests_total", **key, status="2xx") == 2
    assert _value(m, "http_requests_total", handler="none", method="GET", status="4xx") == 1
    assert _value(m, "http_request_duration_seconds_count", **key) == 2
    assert not any(dict(lbl).get("handler") == "/metrics" for _, lbl in _samples(m))
    exact = EngineMetrics("m", group_status_codes=False)
    exact.record_http_request("/v1/completions", "POST", 429, 0.01)
    assert _value(exact, "http_requests_total", handler="/v1/completions", method="POST", status="429") == 1
