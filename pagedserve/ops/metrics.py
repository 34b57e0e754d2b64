"""Prometheus metrics under vLLM's names, so existing dashboards and autoscalers work unchanged.

Exposition names: prometheus-client appends `_total` to counters, and so does vLLM (it declares
`vllm:prompt_tokens` and exposes `vllm:prompt_tokens_total`); we declare the same base names and
get the same series:

    gauges      vllm:num_requests_running / _waiting / _swapped, vllm:kv_cache_usage_perc (0..1)
    counters    vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total (in tokens),
                vllm:num_preemptions_total, vllm:prompt_tokens_total, vllm:generation_tokens_total,
                vllm:request_success_total{finished_reason}
    histograms  vllm:time_to_first_token_seconds, vllm:time_per_output_token_seconds,
                vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds,
                vllm:iteration_tokens_total, vllm:request_prompt_tokens, vllm:request_generation_tokens
    http        http_requests_total{handler,method,status}, http_request_duration_seconds{handler,method}
                (the names and labels of prometheus-fastapi-instrumentator, which vLLM uses)

Per-tenant series (requests, rejections by limit, tokens, concurrency, de-identified entities,
output compliance) are ops/tenant_metrics.py's, in the same registry.
SLOs (pagedserve's own; ops/metrics.py SloMetrics, fed by entrypoints/openai/slo_admission.py):

    counters    pagedserve:slo_requests_total{priority_class,result=met|missed},
                pagedserve:slo_rejected_requests_total{priority_class} (429: predicted queueing delay),
                pagedserve:goodput_requests_total (finished requests that met every objective)
    gauges      pagedserve:slo_attainment{priority_class,objective=ttft|tpot|all} (share meeting it),
                pagedserve:goodput_requests_per_second (over the last 60 s),
                pagedserve:slo_max_num_seqs, pagedserve:slo_max_num_batched_tokens (the controller's
                caps now), pagedserve:slo_predicted_queue_delay_seconds{priority_class}

Every series carries `model_name`. Each EngineMetrics owns its own CollectorRegistry, so several
servers (or tests) in one process never collide.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Bucket edges as vLLM's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
HTTP_LATENCY_BUCKETS = (0.1, 0.5, 1.0)  # prometheus-fastapi-instrumentator's default
FINISHED_REASONS = ("stop", "length", "abort")

CONTENT_TYPE = CONTENT_TYPE_LATEST


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


def _non_negative(**values: float) -> None:
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}.")


class EngineMetrics:
    """The server's metrics. Called from the asyncio loop only (prometheus-client is thread-safe anyway)."""

    def __init__(self, model_name: str, max_model_len: int = 8192, group_status_codes: bool = True) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self._group_status = group_status_codes
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: Any) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.swapped = gauge("vllm:num_requests_swapped", "Number of requests swapped to CPU.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        # Created up front so every reason shows as 0 before the first request (as vLLM).
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.tpot = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            TPOT_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKEN_BUCKETS,
        )
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.http_requests = Counter(
            "http_requests", "Total number of requests by method, status and handler.",
            ["model_name", "handler", "method", "status"], registry=r,
        )  # fmt: skip
        self.http_latency = Histogram(
            "http_request_duration_seconds", "Latency with only few buckets by handler.",
            ["model_name", "handler", "method"], buckets=HTTP_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.slo = SloMetrics(r, model_name)

    # ------------------------------------------------------------------ engine side

    def record_scheduler_stats(
        self,
        running: int,
        waiting: int,
        swapped: int,
        kv_usage: float,
        prefix_queries_delta: int,
        prefix_hits_delta: int,
        preemptions_delta: int,
    ) -> None:
        """One engine step's scheduler state; *_delta are increments since the previous call."""
        _non_negative(
            running=running, waiting=waiting, swapped=swapped, prefix_queries_delta=prefix_queries_delta,
            prefix_hits_delta=prefix_hits_delta, preemptions_delta=preemptions_delta,
        )  # fmt: skip
        if not 0.0 <= kv_usage <= 1.0:
            raise ValueError(f"kv_usage must be a fraction in [0, 1], got {kv_usage}.")
        if prefix_hits_delta > prefix_queries_delta:
            raise ValueError(
                f"prefix_hits_delta ({prefix_hits_delta}) exceeds prefix_queries_delta ({prefix_queries_delta})."
            )
        self.running.set(running)
        self.waiting.set(waiting)
        self.swapped.set(swapped)
        self.kv_usage.set(kv_usage)
        self.prefix_queries.inc(prefix_queries_delta)
        self.prefix_hits.inc(prefix_hits_delta)
        self.preemptions.inc(preemptions_delta)

    def record_iteration(self, num_tokens: int) -> None:
        """Tokens (prompt + generated) one engine step ran."""
        _non_negative(num_tokens=num_tokens)
        self.iteration_tokens.observe(num_tokens)

    def record_request_finished(
        self,
        finished_reason: str,
        prompt_tokens: int,
        generation_tokens: int,
        ttft: float | None,
        tpot: float | None,
        e2e: float,
        queue_time: float | None,
    ) -> None:
        """One finished request. Token counters advance here (a request counts once, when done).

        ttft is None when no token came out (aborted early); tpot is None with < 2 output tokens.
        """
        reason = str(finished_reason)
        if reason not in self.request_success:
            raise ValueError(f"finished_reason must be one of {list(FINISHED_REASONS)}, got {reason!r}.")
        _non_negative(prompt_tokens=prompt_tokens, generation_tokens=generation_tokens, e2e=e2e)
        self.request_success[reason].inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)
        self.e2e.observe(e2e)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        if queue_time is not None:
            self.queue_time.observe(queue_time)

    # ------------------------------------------------------------------ HTTP side

    def record_http_request(self, handler: str, method: str, status: int, latency_s: float) -> None:
        status_label = f"{status // 100}xx" if self._group_status else str(status)
        self.http_requests.labels(self.model_name, handler, method, status_label).inc()
        self.http_latency.labels(self.model_name, handler, method).observe(latency_s)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry (serve with CONTENT_TYPE)."""
        return generate_latest(self.registry)


PRIORITY_CLASSES = ("interactive", "batch")
SLO_OBJECTIVES = ("ttft", "tpot", "all")


class SloMetrics:
    """Attainment per priority class, goodput and the SLO controller's caps (see the top)."""

    def __init__(self, registry: CollectorRegistry, model_name: str, goodput_window_s: float = 60.0) -> None:
        classes, model = PRIORITY_CLASSES, [model_name]
        requests = Counter("pagedserve:slo_requests", "Finished requests by priority class and whether "
                           "they met their SLOs.", ["model_name", "priority_class", "result"], registry=registry)
        self.requests = {(c, r): requests.labels(model_name, c, r) for c in classes for r in ("met", "missed")}
        rejected = Counter("pagedserve:slo_rejected_requests", "Requests refused with 429 because their "
                           "predicted queueing delay passed the TTFT objective.", ["model_name", "priority_class"],
                           registry=registry)  # fmt: skip
        self.rejected = {c: rejected.labels(model_name, c) for c in classes}
        attainment = Gauge("pagedserve:slo_attainment", "Share of finished requests meeting the objective.",
                           ["model_name", "priority_class", "objective"], registry=registry)  # fmt: skip
        self.attainment = {(c, o): attainment.labels(model_name, c, o) for c in classes for o in SLO_OBJECTIVES}
        self.goodput = Counter("pagedserve:goodput_requests", "Finished requests that met all their SLOs.",
                               ["model_name"], registry=registry).labels(*model)  # fmt: skip
        self.goodput_rate = Gauge("pagedserve:goodput_requests_per_second", "Requests per second that met "
                                  "all their SLOs, over the last window.", ["model_name"], registry=registry
                                  ).labels(*model)  # fmt: skip
        self.goodput_rate.set_function(self._goodput_rate)
        self.max_num_seqs = Gauge("pagedserve:slo_max_num_seqs", "The SLO controller's running-batch cap.",
                                  ["model_name"], registry=registry).labels(*model)  # fmt: skip
        self.max_num_batched_tokens = Gauge(
            "pagedserve:slo_max_num_batched_tokens", "The SLO controller's token budget of the last step.",
            ["model_name"], registry=registry).labels(*model)  # fmt: skip
        self.tpot_signal = Gauge(
            "pagedserve:slo_tpot_signal_seconds", "The SLO controller's TPOT signal: the moving high percentile "
            "of its multi-step mean step times.", ["model_name"], registry=registry).labels(*model)  # fmt: skip
        self.mixed_step_model = Gauge(
            "pagedserve:slo_mixed_step_model_seconds", "The controller's step-time model: the running decodes' "
            "step run as a mixed one.", ["model_name"], registry=registry).labels(*model)  # fmt: skip
        self.prefill_allowance = Gauge(
            "pagedserve:slo_prefill_allowance_tokens", "Prefill tokens the controller's feedback lets a step "
            "with decodes take.", ["model_name"], registry=registry).labels(*model)  # fmt: skip
        delay = Gauge("pagedserve:slo_predicted_queue_delay_seconds", "Predicted wait of a new request for a seat "
                      "or for its prefill, the larger (-1: unknown).", ["model_name", "priority_class"], registry=registry)  # fmt: skip
        self.queue_delay = {c: delay.labels(model_name, c) for c in classes}
        self._window_s = goodput_window_s
        self._met_times: deque[float] = deque()
        self._counts = {(c, o): [0, 0] for c in classes for o in SLO_OBJECTIVES}  # met, total
        self._clock = time.monotonic

    def record_finished(self, priority_class: str, ttft_met: bool, tpot_met: bool) -> None:
        for objective, met in (("ttft", ttft_met), ("tpot", tpot_met), ("all", ttft_met and tpot_met)):
            counts = self._counts[(priority_class, objective)]
            counts[0] += met
            counts[1] += 1
            self.attainment[(priority_class, objective)].set(counts[0] / counts[1])
        met_all = ttft_met and tpot_met
        self.requests[(priority_class, "met" if met_all else "missed")].inc()
        if met_all:
            self.goodput.inc()
            self._met_times.append(self._clock())

    def _goodput_rate(self) -> float:
        now = self._clock()
        while self._met_times and self._met_times[0] < now - self._window_s:
            self._met_times.popleft()
        return len(self._met_times) / self._window_s


class HTTPMetricsMiddleware:
    """Pure-ASGI middleware counting HTTP requests by route template, method and status.

    The handler label is the matched route's path template ("/v1/completions"), never the raw
    path: unknown paths all count as "none", so scanners cannot blow up label cardinality.
    """

    def __init__(self, app: Any, metrics: EngineMetrics, skip_paths: tuple[str, ...] = ("/metrics",)) -> None:
        self.app = app
        self.metrics = metrics
        self.skip_paths = skip_paths

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http" or scope.get("path") in self.skip_paths:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app dies before starting a response

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", None) or "none"
            self.metrics.record_http_request(
                handler, scope.get("method", ""), status, time.perf_counter() - start
            )
