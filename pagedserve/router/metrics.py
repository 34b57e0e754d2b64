"""The router's Prometheus metrics (prometheus-client, one registry per router like the server's
EngineMetrics). Counters are declared without `_total`; the exposition adds it.

    pagedserve_router_requests_total{region,backend,route,status}   one per finished attempt
    pagedserve_router_retries_total{reason}         re-dispatches before the first byte
    pagedserve_router_failovers_total{from_region,to_region}
    pagedserve_router_resumed_streams_total{route}  streams continued on another backend
    pagedserve_router_broken_streams_total{route}   streams that could not be resumed (client saw an error)
    pagedserve_router_backend_up{region,backend}    1 while eligible for traffic
    pagedserve_router_circuit_state{region,backend} 0 closed, 1 half-open, 2 open
    pagedserve_router_backend_outstanding{region,backend}
    pagedserve_router_canary_weight, pagedserve_router_canary_rollbacks_total
    pagedserve_router_shadow_requests_total{result}  match / mismatch / not_greedy / error
    pagedserve_router_shadow_agreement_ratio         exact-match rate of greedy mirrored requests
    pagedserve_router_shadow_latency_delta_seconds   shadow minus primary latency
    pagedserve_router_affinity_total{kind,result}    kind session|prefix, result hit|spill
    pagedserve_router_config_reloads_total{result}
    pagedserve_router_request_duration_seconds{route}
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pagedserve.router.pool import Pool

CONTENT_TYPE = CONTENT_TYPE_LATEST
P = "pagedserve_router_"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
DELTA_BUCKETS = (-10.0, -2.5, -1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0, 2.5, 10.0)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        bk = ["region", "backend"]
        self.requests = Counter(P + "requests", "Attempts by backend and HTTP status",
                                ["region", "backend", "route", "status"], registry=r)  # fmt: skip
        self.retries = Counter(P + "retries", "Re-dispatches before the first byte", ["reason"], registry=r)
        self.failovers = Counter(P + "failovers", "Requests moved to another region",
                                 ["from_region", "to_region"], registry=r)  # fmt: skip
        self.resumed = Counter(P + "resumed_streams", "Streams resumed on another backend", ["route"], registry=r)
        self.broken = Counter(P + "broken_streams", "Streams that could not be resumed", ["route"], registry=r)
        self.up = Gauge(P + "backend_up", "1 while the backend gets traffic", bk, registry=r)
        self.circuit = Gauge(P + "circuit_state", "0 closed, 1 half-open, 2 open", bk, registry=r)
        self.outstanding = Gauge(P + "backend_outstanding", "Requests in flight", bk, registry=r)
        self.canary_weight = Gauge(P + "canary_weight", "Current canary traffic share", registry=r)
        self.canary_rollbacks = Counter(P + "canary_rollbacks", "Automatic canary rollbacks", registry=r)
        self.shadow = Counter(P + "shadow_requests", "Mirrored requests by outcome", ["result"], registry=r)
        self.shadow_agreement = Gauge(P + "shadow_agreement_ratio",
                                      "Exact-match rate of greedy mirrored requests", registry=r)  # fmt: skip
        self.shadow_delta = Histogram(P + "shadow_latency_delta_seconds", "Shadow minus primary latency",
                                      buckets=DELTA_BUCKETS, registry=r)  # fmt: skip
        self.affinity = Counter(P + "affinity", "Affinity-routed requests", ["kind", "result"], registry=r)
        self.reloads = Counter(P + "config_reloads", "Config reloads", ["result"], registry=r)
        self.duration = Histogram(P + "request_duration_seconds", "Client-visible request latency",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self._shadow_match = 0
        self._shadow_greedy = 0

    def record_shadow(self, result: str) -> None:
        self.shadow.labels(result).inc()
        if result in ("match", "mismatch"):
            self._shadow_greedy += 1
            self._shadow_match += result == "match"
            self.shadow_agreement.set(self._shadow_match / self._shadow_greedy)

    def render(self, pool: Pool) -> bytes:
        for b in pool.backends.values():
            labels = (b.region, b.url)
            self.up.labels(*labels).set(1.0 if b.eligible() else 0.0)
            self.circuit.labels(*labels).set(float(b.breaker.state))
            self.outstanding.labels(*labels).set(float(b.outstanding))
        self.canary_weight.set(pool.canary_weight)
        return generate_latest(self.registry)
