"""Router basics on fake backends: config validation, priority regions, least-outstanding choice,
retry before the first byte, health probes, circuit breaker, error format, /health, /metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pagedserve.entrypoints.cli import main as cli_main
from pagedserve.router.backends import CircuitBreaker, CircuitState
from pagedserve.router.config import BreakerConfig, ConfigError, load_config, parse_config
from tests.router.conftest import region, running_router, wait_for
from tests.router.fakes import expected_chat, expected_completion, sse_events

MSGS = [{"role": "user", "content": "hello there"}]


def _cfg(**kw: Any) -> dict[str, Any]:
    return {"regions": [{"name": "a", "backends": [{"url": "http://127.0.0.1:1"}]}], **kw}


@pytest.mark.parametrize("bad, needle", [
    ({"regions": []}, "regions"),
    (_cfg(bogus=1), "bogus"),
    ({"regions": [{"name": "a", "backends": [{"url": "ftp://x"}]}]}, "http://"),
    ({"regions": [{"name": "a", "backends": [{"url": "http://x", "weight": 0}]}]}, "weight"),
    ({"regions": [{"name": "a", "backends": [{"url": "http://x"}]},
                  {"name": "a", "backends": [{"url": "http://y"}]}]}, "unique"),
    ({"regions": [{"name": "a", "backends": [{"url": "http://x"}, {"url": "http://x/"}]}]}, "only once"),
    (_cfg(tenants={"acme": ["nowhere"]}), "nowhere"),
    (_cfg(auth={"jwt_secret": "s"}), "jwt_audience"),
    (_cfg(canary={"backends": [], "weight": 0.5}), "canary.backends"),
])  # fmt: skip
def test_config_errors_name_the_key(bad: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(bad)
    assert needle in str(info.value)


def test_config_file_and_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "ok.yaml"
    good.write_text(yaml.safe_dump(_cfg(listen={"host": "127.0.0.1", "port": 9100})))
    cfg = load_config(good)
    assert cfg.listen.port == 9100 and cfg.probe_interval_s == 1.0 and cfg.regions[0].backends[0].weight == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("regions: [{name: a, backends: [{url: 'http://x', weight: -1}]}]\n")
    assert cli_main(["router", "--config", str(bad)]) == 1
    assert "regions.0.backends.0.weight" in capsys.readouterr().err
    bad.write_text("regions: [unclosed\n")
    assert cli_main(["router", "--config", str(bad)]) == 1
    assert "not valid YAML" in capsys.readouterr().err


def test_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[2] / "examples" / "router.yaml")
    assert [r.name for r in cfg.regions] == ["shanghai", "beijing"]
    assert cfg.canary is not None and cfg.canary.weight == 0.1 and cfg.tenants == {"acme": ["beijing"]}


def test_circuit_breaker_states() -> None:
    cb = CircuitBreaker(BreakerConfig(failure_threshold=2, open_s=5.0))
    assert cb.allows(0.0)
    assert not cb.record_failure(0.0) and cb.state is CircuitState.CLOSED
    cb.record_success()
    assert not cb.record_failure(1.0)  # success reset the count
    assert cb.record_failure(1.0) and cb.state is CircuitState.OPEN and not cb.allows(2.0)
    assert cb.allows(6.1) and cb.state is CircuitState.HALF_OPEN
    cb.on_dispatch()
    assert not cb.allows(6.2)  # one trial at a time
    assert cb.record_failure(6.3) and cb.state is CircuitState.OPEN  # failed trial reopens
    assert cb.allows(11.4)
    cb.on_dispatch()
    cb.record_success()
    assert cb.state is CircuitState.CLOSED and cb.allows(11.5)


def test_priority_region_and_least_outstanding(fakes: Any, tmp_path: Path) -> None:
    a1, a2, b1 = fakes("a1"), fakes("a2"), fakes("b1")
    cfg = {"regions": [region("b", 1, b1), region("a", 0, a1, a2)], "affinity": {"prefix": False}}
    with running_router(cfg, tmp_path) as (_, url):
        for i in range(6):
            r = httpx.post(url + "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 4}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected_completion(f"p{i}", 4)
        assert len(a1.gen_bodies()) == len(a2.gen_bodies()) == 3  # ties rotate inside the region
        assert b1.gen_bodies() == []  # the lower-priority region idles while "a" is up


def test_non_streamed_failover_on_5xx_and_refused(fakes: Any, tmp_path: Path) -> None:
    bad, dead, good = fakes("bad", status=500), fakes("dead"), fakes("good")
    cfg = {"regions": [region("a", 0, bad, dead), region("b", 1, good)], "affinity": {"prefix": False},
           "breaker": {"failure_threshold": 2, "open_s": 600}}  # once open, it stays open in this test
    with running_router(cfg, tmp_path) as (router, url):
        dead.stop()  # connection refused from now on
        for _ in range(6):
            r = httpx.post(url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 5}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected_chat(MSGS, 5)
        assert len(good.gen_bodies()) == 6
        assert len(bad.gen_bodies()) <= 2  # the breaker (threshold 2) stopped sending it traffic
        assert router.pool.backends[bad.url].breaker.state is not CircuitState.CLOSED
        text = httpx.get(url + "/metrics").text
        assert 'pagedserve_router_failovers_total{from_region="a",to_region="b"}' in text
        assert f'pagedserve_router_circuit_state{{backend="{bad.url}",region="a"}} 2.0' in text


def test_loading_backend_gets_no_traffic_and_client_errors_pass_through(fakes: Any, tmp_path: Path) -> None:
    loading, picky = fakes("loading", health=503), fakes("picky", status=400)
    cfg = {"regions": [region("a", 0, loading), region("b", 1, picky)]}
    with running_router(cfg, tmp_path) as (router, url):
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30)
        assert r.status_code == 400
        assert r.json()["error"] == {"message": "picky fails", "type": "server_error", "param": None, "code": 400}
        assert len(picky.gen_bodies()) == 1  # a client error is not retried
        assert loading.gen_bodies() == []
        health = httpx.get(url + "/health").json()
        assert health["regions"]["a"]["up"] is False and health["regions"]["b"]["up"] is True
        loading.behaviour.health = 200  # finished loading: traffic moves to the preferred region
        wait_for(lambda: router.pool.backends[loading.url].eligible(), what="probe marks it up")
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_completion("x", 3)


def test_no_backend_is_openai_503_and_router_health(fakes: Any, tmp_path: Path) -> None:
    only = fakes("only", health=503)
    with running_router({"regions": [region("a", 0, only)], "retry_deadline_s": 0.5}, tmp_path) as (_, url):
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "service_unavailable_error"
        r = httpx.post(url + "/v1/completions", content=b"{nope", timeout=30)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        h = httpx.get(url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "unavailable"


def test_streaming_proxy_is_one_wellformed_stream(fakes: Any, tmp_path: Path) -> None:
    a = fakes("a")
    with running_router({"regions": [region("a", 0, a)]}, tmp_path) as (_, url):
        body = {"messages": MSGS, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) \
            == expected_chat(MSGS, 8)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
        assert all(c["usage"] is None for c in chunks[:-1])  # no continuous usage unless asked
        # the backend was asked for what a resume needs
        sent = a.gen_bodies()[0]
        assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_streaming_retry_before_first_byte_and_openai_client(fakes: Any, tmp_path: Path) -> None:
    import openai

    bad, good = fakes("bad", status=503), fakes("good")
    with running_router({"regions": [region("a", 0, bad), region("b", 1, good)]}, tmp_path) as (_, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="fake", prompt="abc", max_tokens=6, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected_completion("abc", 6)
        assert client.models.list().data[0].id == "fake"
        assert len(good.gen_bodies()) == 1


def test_auth_as_the_server_and_tenant_pinning(fakes: Any, tmp_path: Path) -> None:
    a, b = fakes("a"), fakes("b")
    key_file = tmp_path / "keys"
    key_file.write_text("sk-acme acme\nsk-other\n")
    cfg = {"regions": [region("a", 0, a, api_key="backend-key"), region("b", 1, b)],
           "auth": {"api_key_file": str(key_file), "use_env": False}, "tenants": {"acme": ["b"]}}
    with running_router(cfg, tmp_path) as (_, url):
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/health").status_code == 200  # only /v1 is guarded
        ok = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer sk-other"})
        assert ok.status_code == 200 and len(a.gen_bodies()) == 1
        assert a.auth_headers == ["Bearer backend-key"]  # the backend's own key, not the client's
        pinned = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer sk-acme"})
        assert pinned.status_code == 200 and len(b.gen_bodies()) == 1  # acme is pinned to region b
