"""Affinity (session header, prompt prefix with bounded load), canary share and automatic
rollback, shadow mirroring with agreement metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from pagedserve.router.backends import Backend, CircuitBreaker
from pagedserve.router.config import BreakerConfig, parse_config
from pagedserve.router.metrics import RouterMetrics
from pagedserve.router.pool import Pool
from pagedserve.router.release import CanaryGuard
from tests.router.conftest import region, running_router, wait_for
from tests.router.fakes import expected_completion, sse_events


def _metric(url: str, name: str, labels: str = "") -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + (labels or "")) and not line.startswith("#"):
            head = line.rsplit(" ", 1)[0]
            if labels or head == name:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _pool(n: int, **affinity: Any) -> Pool:
    urls = [f"http://10.0.0.{i}:8000" for i in range(n)]
    cfg = parse_config({"regions": [{"name": "a", "backends": [{"url": u} for u in urls]}], "affinity": affinity})
    pool = Pool(cfg)
    for b in pool.backends.values():
        b.probe_ok = True
    return pool


def test_consistent_hashing_with_bounded_load() -> None:
    pool = _pool(3, load_factor=1.25)
    homes = {f"key{i}": pool.choose(set(), key=f"key{i}").backend for i in range(60)}  # type: ignore[union-attr]
    assert all(pool.choose(set(), key=k).backend is b for k, b in homes.items())  # type: ignore[union-attr]
    assert len(set(homes.values())) == 3  # keys spread over every backend
    # Removing one backend moves only its own keys.
    gone = next(iter(pool.backends.values()))
    gone.probe_ok = False
    for k, b in homes.items():
        now = pool.choose(set(), key=k).backend  # type: ignore[union-attr]
        assert (now is b) == (b is not gone)
    gone.probe_ok = True
    # Bounded load: the key's home is busy beyond 1.25 x the mean -> the next backend on the ring.
    key, home = next(iter(homes.items()))
    home.outstanding = 10
    choice = pool.choose(set(), key=key)
    assert choice is not None and choice.backend is not home and choice.affinity == "spill"
    home.outstanding = 0
    assert pool.choose(set(), key=key).affinity == "hit"  # type: ignore[union-attr]


def test_session_and_prefix_affinity_over_http(fakes: Any, tmp_path: Path) -> None:
    backends = [fakes(f"b{i}") for i in range(3)]
    cfg = {"regions": [region("a", 0, *backends)], "affinity": {"prefix_chars": 64}}
    with running_router(cfg, tmp_path) as (_, url):
        def who(**kw: Any) -> int:
            before = [len(b.gen_bodies()) for b in backends]
            r = httpx.post(url + "/v1/completions", timeout=30, **kw)
            assert r.status_code == 200
            return [len(b.gen_bodies()) - n for b, n in zip(backends, before)].index(1)

        sessions = {s: {who(json={"prompt": f"q{j}", "max_tokens": 2}, headers={"x-session-id": s})
                        for j in range(4)} for s in ("alice", "bob", "carol", "dave")}
        assert all(len(v) == 1 for v in sessions.values())  # each session sticks to one backend
        shared = "You are a helpful assistant. " * 4
        homes = {who(json={"prompt": shared + f"question {j}", "max_tokens": 2}) for j in range(5)}
        assert len(homes) == 1  # one prompt prefix, one backend: its prefix cache stays warm
        assert _metric(url, "pagedserve_router_affinity_total", '{kind="session",result="hit"}') == 16
        assert _metric(url, "pagedserve_router_affinity_total", '{kind="prefix",result="hit"}') == 5


def test_canary_share_then_rollback_on_errors(fakes: Any, tmp_path: Path) -> None:
    prim, canary = fakes("prim"), fakes("canary")
    # A breaker that never opens here: the rollback alone must take the canary out.
    cfg = {"regions": [region("a", 0, prim)], "affinity": {"prefix": False},
           "breaker": {"failure_threshold": 1000, "open_s": 1},
           "canary": {"backends": [{"url": canary.url}], "weight": 0.25, "min_requests": 3,
                      "max_error_rate": 0.5, "window_s": 600}}  # fmt: skip
    with running_router(cfg, tmp_path) as (router, url):
        for i in range(8):
            r = httpx.post(url + "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 3}, timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_completion(f"p{i}", 3)
        assert len(canary.gen_bodies()) == 2 and len(prim.gen_bodies()) == 6  # exactly the 25% share
        canary.behaviour.status = 500  # the new release starts failing
        for i in range(16):
            r = httpx.post(url + "/v1/completions", json={"prompt": f"e{i}", "max_tokens": 3}, timeout=30)
            assert r.status_code == 200  # canary failures are retried on the primary
        assert router.pool.canary_weight == 0.0
        assert httpx.get(url + "/health").json()["canary"]["weight"] == 0.0
        assert _metric(url, "pagedserve_router_canary_rollbacks_total") == 1.0
        assert _metric(url, "pagedserve_router_canary_weight") == 0.0
        # window: 2 ok + k errors; rollback once errors > 50% of >= 3 -> at the 3rd error (3/5)
        assert len(canary.gen_bodies()) == 5


def test_canary_rollback_on_p99() -> None:
    cfg = parse_config({"regions": [{"name": "a", "backends": [{"url": "http://x"}]}],
                        "canary": {"backends": [{"url": "http://c"}], "weight": 0.5, "min_requests": 4,
                                   "max_p99_s": 1.0, "window_s": 10}})  # fmt: skip
    pool, metrics, guard = Pool(cfg), RouterMetrics(), CanaryGuard()
    assert not any(guard.record(pool, metrics, True, 0.1, now=float(t)) for t in range(6))
    assert not guard.record(pool, metrics, True, 5.0, now=100.0)  # old samples slid out: 1 sample
    assert not guard.record(pool, metrics, True, 0.1, now=101.0)
    assert not guard.record(pool, metrics, True, 0.1, now=102.0)
    assert guard.record(pool, metrics, True, 0.2, now=103.0)  # 4 samples, P99 = 5.0 s > 1.0 s
    assert pool.canary_weight == 0.0


def test_shadow_mirrors_and_measures_agreement(fakes: Any, tmp_path: Path) -> None:
    prim, same, other = fakes("prim"), fakes("same"), fakes("other", salt=5)
    cfg = {"regions": [region("a", 0, prim)], "shadow": {"backends": [{"url": same.url}], "fraction": 0.5}}
    with running_router(cfg, tmp_path) as (router, url):
        for i in range(4):  # every second request is mirrored: s1, s3
            body = {"prompt": f"s{i}", "max_tokens": 4, "temperature": 0}
            assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200
        assert httpx.post(url + "/v1/completions", json={"prompt": "t", "max_tokens": 2}).status_code == 200
        with httpx.stream("POST", url + "/v1/completions", timeout=30,  # mirrored
                          json={"prompt": "zz", "max_tokens": 4, "temperature": 0, "stream": True}) as r:
            assert sse_events(r.iter_lines())[-1] == "[DONE]"
        for p in ("t2", "t3"):  # t3 mirrored, but sampled: only its latency is compared
            assert httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 2}).status_code == 200
        wait_for(lambda: _metric(url, "pagedserve_router_shadow_requests_total", '{result="not_greedy"}') == 1
                 and _metric(url, "pagedserve_router_shadow_requests_total", '{result="match"}') == 3,
                 what="3 greedy mirrors agreeing and the sampled one")
        assert len(same.gen_bodies()) == 4 and len(prim.gen_bodies()) == 8
        assert all(not b.get("stream") for b in same.gen_bodies())  # mirrors are collected whole
        assert _metric(url, "pagedserve_router_shadow_agreement_ratio") == 1.0
        # A shadow that disagrees brings the ratio down.
        router.pool.apply(parse_config({**router.pool.config.model_dump(),
                                        "shadow": {"backends": [{"url": other.url}], "fraction": 1.0}}))
        wait_for(lambda: router.pool.backends[other.url].probe_ok, what="shadow probed")
        assert httpx.post(url + "/v1/completions", json={"prompt": "u", "max_tokens": 4, "temperature": 0}).status_code == 200
        wait_for(lambda: _metric(url, "pagedserve_router_shadow_requests_total", '{result="mismatch"}') == 1,
                 what="a mismatch")
        assert _metric(url, "pagedserve_router_shadow_agreement_ratio") == 0.75


def test_backend_load_is_weighted() -> None:
    heavy = Backend("http://h", "a", "primary", 3.0, None, CircuitBreaker(BreakerConfig()))
    light = Backend("http://l", "a", "primary", 1.0, None, CircuitBreaker(BreakerConfig()))
    heavy.outstanding, light.outstanding = 2, 0
    assert heavy.load() == light.load() == 1.0  # 3 in flight on weight 3 = 1 on weight 1
