"""Per-tenant series in the server's /metrics registry (next to EngineMetrics' vLLM series).

    pagedserve:tenant_requests_total{model_name,tenant}              admitted requests
    pagedserve:tenant_rejected_requests_total{model_name,tenant,limit}
                limit: requests_per_minute | tokens_per_minute | max_concurrent | max_tokens | model
    pagedserve:tenant_prompt_tokens_total{model_name,tenant}
    pagedserve:tenant_generation_tokens_total{model_name,tenant}
    pagedserve:tenant_requests_in_flight{model_name,tenant}         gauge
    pagedserve:tenant_peak_concurrent_requests{model_name,tenant}   gauge: most in flight at once
    pagedserve:tenant_deidentified_entities_total{model_name,tenant,entity}   (counts only; no values)
    pagedserve:output_validations_total{model_name,tenant,result}   result: pass | fail
    pagedserve:output_compliance_rate{model_name,tenant}            gauge: pass / (pass + fail)

Cardinality is bounded: `tenant` comes from TenantLabels (configured tenants plus at most
max_tenant_labels others, then "other"), `model_name` from the served model names only, and
`limit`, `entity`, `result` from fixed sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "max_tokens", "model")


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model_name", "tenant"]
        r = registry
        self.requests = Counter("pagedserve:tenant_requests", "Requests admitted, by tenant.", labels, registry=r)
        self.rejected = Counter("pagedserve:tenant_rejected_requests", "Requests refused by a tenant limit.",
                                [*labels, "limit"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("pagedserve:tenant_prompt_tokens", "Prompt tokens, by tenant.", labels,
                                     registry=r)  # fmt: skip
        self.generation_tokens = Counter("pagedserve:tenant_generation_tokens", "Generated tokens, by tenant.",
                                         labels, registry=r)  # fmt: skip
        self.in_flight = Gauge("pagedserve:tenant_requests_in_flight", "Admitted requests not finished.",
                               labels, registry=r)  # fmt: skip
        self.peak = Gauge("pagedserve:tenant_peak_concurrent_requests",
                          "The most requests of the tenant in flight at once since start.", labels, registry=r)
        self.deidentified = Counter("pagedserve:tenant_deidentified_entities",
                                    "Personal identifiers replaced by placeholders, by type.",
                                    [*labels, "entity"], registry=r)  # fmt: skip
        self.validations = Counter("pagedserve:output_validations", "Constrained outputs post-checked.",
                                   [*labels, "result"], registry=r)  # fmt: skip
        self.compliance = Gauge("pagedserve:output_compliance_rate",
                                "Share of constrained outputs that passed the post-check.", labels, registry=r)
        self._checked: dict[tuple[str, str], list[int]] = {}  # (model, tenant) -> [passed, total]

    def admitted(self, model: str, tenant: str, in_flight: int, peak: int) -> None:
        self.requests.labels(model, tenant).inc()
        self.in_flight.labels(model, tenant).set(in_flight)
        self.peak.labels(model, tenant).set(peak)

    def finished(self, model: str, tenant: str, prompt_tokens: int, completion_tokens: int, in_flight: int) -> None:
        self.prompt_tokens.labels(model, tenant).inc(prompt_tokens)
        self.generation_tokens.labels(model, tenant).inc(completion_tokens)
        self.in_flight.labels(model, tenant).set(in_flight)

    def rejected_by(self, model: str, tenant: str, limit: str) -> None:
        if limit not in LIMITS:
            raise ValueError(f"limit must be one of {LIMITS}, got {limit!r}")
        self.rejected.labels(model, tenant, limit).inc()

    def deidentified_entities(self, model: str, tenant: str, counts: dict[str, int]) -> None:
        for entity, n in counts.items():
            self.deidentified.labels(model, tenant, entity).inc(n)

    def validated(self, model: str, tenant: str, passed: bool) -> None:
        self.validations.labels(model, tenant, "pass" if passed else "fail").inc()
        tally = self._checked.setdefault((model, tenant), [0, 0])
        tally[0] += int(passed)
        tally[1] += 1
        self.compliance.labels(model, tenant).set(tally[0] / tally[1])
