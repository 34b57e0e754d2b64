"""Tenant limits on a real server: request and token rates (429 + Retry-After naming the limit),
the concurrency cap under 200 concurrent requests, max_tokens and model limits, /metrics counts."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.server.conftest import RunningServer
from tests.tenants.conftest import audit_lines, headers, metric_value, metrics, wait_metric

PROMPT_IDS = list(range(5, 15))  # exactly 10 prompt tokens


def completion(tenant: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 4, "ignore_eos": True, "temperature": 0,
            **extra}  # fmt: skip


async def send_all(server: RunningServer, bodies: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.v1, timeout=120, limits=limits) as client:
        return list(await asyncio.gather(*(
            client.post("/completions", json=body, headers=headers(tenant)) for tenant, body in bodies
        )))  # fmt: skip


def assert_rate_limited(r: httpx.Response, limit: str) -> None:
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["param"] == limit and limit in err["message"]


def test_request_rate_limits_one_tenant_not_the_other(tenant_server: RunningServer) -> None:
    bodies = [("limited", completion("limited")) for _ in range(8)] + [("free", completion("free")) for _ in range(8)]
    responses = asyncio.run(send_all(tenant_server, bodies))
    limited, free = responses[:8], responses[8:]
    assert [r.status_code for r in free] == [200] * 8
    ok = [r for r in limited if r.status_code == 200]
    refused = [r for r in limited if r.status_code != 200]
    assert len(ok) == 5 and len(refused) == 3
    for r in refused:
        assert_rate_limited(r, "requests_per_minute")
    text = metrics(tenant_server)
    assert metric_value(text, "pagedserve:tenant_requests_total", tenant="limited") == 5
    assert metric_value(text, "pagedserve:tenant_rejected_requests_total", tenant="limited",
                        limit="requests_per_minute") == 3  # fmt: skip
    assert metric_value(text, "pagedserve:tenant_requests_total", tenant="free") == 8
    assert metric_value(text, "pagedserve:tenant_rejected_requests_total", tenant="free") == 0
    assert wait_metric(tenant_server, "pagedserve:tenant_prompt_tokens_total", 80, tenant="free") == 80
    assert wait_metric(tenant_server, "pagedserve:tenant_generation_tokens_total", 32, tenant="free") == 32
    # the audit log has every request with its tenant: served ones with their tokens, refusals as 429
    lines = [a for a in audit_lines(tenant_server) if a["tenant"] == "limited"]
    assert sorted(a["http_status"] for a in lines) == [200] * 5 + [429] * 3
    assert sum(a["prompt_tokens"] + a["completion_tokens"] for a in lines) == 5 * 14


def test_token_rate_counts_prompt_and_completion(tenant_server: RunningServer) -> None:
    # 10 prompt + 20 completion tokens each (ignore_eos): three fit in 100 tokens per minute
    body = completion("tokens", max_tokens=20)
    statuses = []
    for _ in range(3):
        r = httpx.post(tenant_server.v1 + "/completions", json=body, headers=headers("tokens"), timeout=60)
        statuses.append(r.status_code)
        assert r.json()["usage"]["total_tokens"] == 30
    assert statuses == [200, 200, 200]
    r = httpx.post(tenant_server.v1 + "/completions", json=body, headers=headers("tokens"), timeout=60)
    assert_rate_limited(r, "tokens_per_minute")
    # 90 tokens are in the window: even 10 prompt + 1 completion token is over the limit now
    small = completion("tokens", max_tokens=1)
    assert_rate_limited(httpx.post(tenant_server.v1 + "/completions", json=small, headers=headers("tokens")),
                        "tokens_per_minute")  # fmt: skip
    assert wait_metric(tenant_server, "pagedserve:tenant_prompt_tokens_total", 30, tenant="tokens") == 30
    assert wait_metric(tenant_server, "pagedserve:tenant_generation_tokens_total", 60, tenant="tokens") == 60
    assert metric_value(metrics(tenant_server), "pagedserve:tenant_rejected_requests_total", tenant="tokens",
                        limit="tokens_per_minute") == 2  # fmt: skip


def test_200_concurrent_requests_never_exceed_the_concurrency_cap(tenant_server: RunningServer) -> None:
    bodies = [("capped", completion("capped", max_tokens=2)) for _ in range(200)]
    responses = asyncio.run(send_all(tenant_server, bodies))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert ok, "some requests must get through"
    for r in refused:
        assert_rate_limited(r, "max_concurrent")
    text = metrics(tenant_server)
    peak = metric_value(text, "pagedserve:tenant_peak_concurrent_requests", tenant="capped")
    assert 1 <= peak <= 3
    assert metric_value(text, "pagedserve:tenant_requests_total", tenant="capped") == len(ok)
    assert metric_value(text, "pagedserve:tenant_rejected_requests_total", tenant="capped",
                        limit="max_concurrent") == len(refused)  # fmt: skip
    assert wait_metric(tenant_server, "pagedserve:tenant_requests_in_flight", 0, tenant="capped") == 0


def test_max_tokens_and_model_limits(tenant_server: RunningServer) -> None:
    url = tenant_server.v1 + "/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    r = httpx.post(url, json={"model": "tiny", "messages": msg, "max_tokens": 9}, headers=headers("capped"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    # no max_tokens: the tenant's cap is the default
    r = httpx.post(url, json={"model": "tiny", "messages": msg, "ignore_eos": True}, headers=headers("capped"),
                   timeout=60)  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    r = httpx.post(url, json={"model": "tiny", "messages": msg, "max_tokens": 1}, headers=headers("nomodel"))
    assert r.status_code == 403 and r.json()["error"]["param"] == "model"
    text = metrics(tenant_server)
    assert metric_value(text, "pagedserve:tenant_rejected_requests_total", tenant="capped", limit="max_tokens") == 1
    assert metric_value(text, "pagedserve:tenant_rejected_requests_total", tenant="nomodel", limit="model") == 1
    # unlabelled tenants never appear: the label set is the configured tenants
    assert "tenant=\"sk-" not in text
