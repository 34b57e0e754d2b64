"""Prefix-cache isolation on a real server: tenant salts keep one tenant's cached prompt blocks from
another (engine prefix-cache counters in /metrics), a shared cache_group shares them."""

from __future__ import annotations

import httpx

from tests.server.conftest import RunningServer
from tests.tenants.conftest import headers, metric_value, metrics

BLOCK = 16


def hits_of(server: RunningServer, tenant: str, prompt: list[int]) -> tuple[float, int]:
    """(engine prefix-cache hits this request added, its usage cached_tokens)."""
    before = metric_value(metrics(server), "vllm:prefix_cache_hits_total")
    r = httpx.post(server.v1 + "/completions", headers=headers(tenant), timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    after = metric_value(metrics(server), "vllm:prefix_cache_hits_total")
    details = r.json()["usage"].get("prompt_tokens_details") or {}
    return after - before, int(details.get("cached_tokens") or 0)


def test_tenant_salts_isolate_and_a_shared_group_shares(tenant_server: RunningServer) -> None:
    prompt = [(7 * i + 3) % 500 + 1 for i in range(3 * BLOCK + 5)]  # 3 full blocks, unique to this test
    full = 3 * BLOCK
    assert hits_of(tenant_server, "salt_a", prompt) == (0, 0)
    assert hits_of(tenant_server, "salt_a", prompt) == (full, full)  # A's repeat hits A's blocks
    assert hits_of(tenant_server, "salt_b", prompt) == (0, 0)  # B sending A's exact prompt: no hit
    assert hits_of(tenant_server, "salt_b", prompt) == (full, full)
    # a request's own cache_salt cannot reach another tenant's blocks either
    r = httpx.post(tenant_server.v1 + "/completions", headers=headers("salt_b"), timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "cache_salt": "tenant:salt_a"})
    assert r.status_code == 200 and not (r.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")

    shared = [p + 1 for p in prompt]
    assert hits_of(tenant_server, "shared_1", shared) == (0, 0)
    assert hits_of(tenant_server, "shared_2", shared) == (full, full)  # same cache_group: shared
    assert hits_of(tenant_server, "salt_a", shared) == (0, 0)  # outside the group: isolated
