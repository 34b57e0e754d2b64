"""Admission control on a real server (tiny model, CPU): past the TTFT objective's predicted
queueing delay new requests get 429 + Retry-After + an OpenAI error JSON, so the queue (and the
TTFT of what is admitted) stays bounded while the offered load keeps coming; SLO series on
/metrics. The unit tests drive SloAdmission with made-up engine reports."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from pagedserve.config import SloConfig
from pagedserve.core.stats import SchedulerStats
from pagedserve.engine.async_llm import FinishedRequestStats
from pagedserve.entrypoints.openai.errors import RateLimitError
from pagedserve.entrypoints.openai.slo_admission import SloAdmission, priority_class_of
from pagedserve.ops.metrics import EngineMetrics
from tests.server.conftest import RunningServer, start_server

NUM_SENT = 48


@pytest.fixture(scope="module")
def slo_server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("slo_server")
    # two seats at most, a 1 ms TTFT objective: any backlog at all predicts a longer wait
    extra = ["--max-num-seqs", "2", "--slo-ttft-ms", "1", "--slo-tpot-ms", "interactive=5000,batch=10000"]
    with start_server(tiny_checkpoints["llama"], tmp, extra=extra) as server:
        yield server


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_overload_is_shed_with_429_and_retry_after(slo_server: RunningServer) -> None:
    body = {"model": "tiny", "prompt": "the model runs", "max_tokens": 40, "ignore_eos": True, "temperature": 0}

    async def run() -> tuple[list[httpx.Response], list[int]]:
        waiting: list[int] = []
        async with httpx.AsyncClient(base_url=slo_server.base_url, timeout=300) as http:
            tasks = []
            for _ in range(NUM_SENT):  # a steady offered load far above two seats' capacity
                tasks.append(asyncio.create_task(http.post("/v1/completions", json=body)))
                await asyncio.sleep(0.02)
                m = (await http.get("/metrics")).text
                waiting.append(int(_metric(m, "vllm:num_requests_waiting")))
            return list(await asyncio.gather(*tasks)), waiting

    responses, waiting = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    shed = [r for r in responses if r.status_code == 429]
    for r in shed:
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["code"] == 429 and error["type"] == "overloaded_error"
        assert "time-to-first-token objective (1 ms)" in error["message"]
    # the queue stays short while the load keeps coming: without shedding every request beyond
    # the two seats would wait (a queue growing towards NUM_SENT - 2)
    assert max(waiting) < NUM_SENT // 2, waiting
    metrics = httpx.get(slo_server.base_url + "/metrics").text
    assert _metric(metrics, "pagedserve:slo_rejected_requests_total", priority_class="interactive") == len(shed)
    assert _metric(metrics, "pagedserve:slo_max_num_seqs") == 2  # the configured maximum bounds the controller
    met = _metric(metrics, "pagedserve:slo_requests_total", priority_class="interactive", result="met")
    missed = _metric(metrics, "pagedserve:slo_requests_total", priority_class="interactive", result="missed")
    assert met + missed == codes.count(200)
    attained = _metric(metrics, "pagedserve:slo_attainment", priority_class="interactive", objective="all")
    assert attained == pytest.approx(met / (met + missed))
    assert _metric(metrics, "pagedserve:goodput_requests_total") == met
    assert re.search(r"^pagedserve:goodput_requests_per_second\{", metrics, re.M)


def test_batch_class_field_and_bad_class(slo_server: RunningServer) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "priority_class": "batch"}
    r = httpx.post(slo_server.v1 + "/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(slo_server.v1 + "/completions", json=body | {"priority_class": "urgent"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority_class"
    metrics = httpx.get(slo_server.base_url + "/metrics").text
    batch = [_metric(metrics, "pagedserve:slo_requests_total", priority_class="batch", result=r)
             for r in ("met", "missed")]  # fmt: skip
    assert sum(batch) == 1  # counted under its own class


# ---------------------------------------------------------------------------- units


def _stats(waiting: int, waiting_batch: int, rate_i: float | None, rate_b: float | None,
           ramping: bool = False) -> SchedulerStats:  # fmt: skip
    return SchedulerStats(num_running=2, num_waiting=waiting, num_swapped=0, kv_cache_usage=0.1,
                          prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
                          num_scheduled_tokens=2, kv_slots_allocated=0, kv_slots_wasted=0,
                          slo_max_num_seqs=8, slo_token_budget=512, num_waiting_batch=waiting_batch,
                          admit_rate_interactive=rate_i, admit_rate_batch=rate_b, slo_ramping=ramping)  # fmt: skip


def test_admission_predicts_per_class_and_sets_retry_after() -> None:
    metrics = EngineMetrics("m")
    slo = SloConfig(ttft_s={"interactive": 0.5, "batch": 4.0}, tpot_s={"interactive": 0.05})
    adm = SloAdmission(slo, metrics.slo)
    adm.check(1, "interactive")  # no report yet: nothing to predict from, admitted
    adm.on_stats(_stats(waiting=11, waiting_batch=8, rate_i=10.0, rate_b=1.0))
    # interactive: 3 ahead / 10 per s = 0.3 s <= 0.8 x 0.5 s; the next one sees 4 ahead (it
    # counts the one just sent) = 0.4 s, still in; then 5 / 10 = 0.5 s > 0.4 s: 429
    adm.check(1, "interactive")
    adm.check(1, "interactive")
    with pytest.raises(RateLimitError) as e:
        adm.check(1, "interactive")
    # drain to the objective's share: (5 - 0.4 * 10) / 10 = 0.1 s -> at least 1 s
    assert e.value.headers["Retry-After"] == "1"
    # batch: 8 ahead / 1 per s = 8 s > 0.8 x 4 s; Retry-After (8 - 3.2) / 1 = 4.8 -> 5 s
    with pytest.raises(RateLimitError) as e:
        adm.check(1, "batch")
    assert e.value.headers["Retry-After"] == "5"
    # a starved class (rate 0 while it waits) is refused whatever the objective
    adm.on_stats(_stats(waiting=3, waiting_batch=3, rate_i=10.0, rate_b=0.0))
    with pytest.raises(RateLimitError):
        adm.check(1, "batch")
    text = metrics.render().decode()
    assert 'pagedserve:slo_rejected_requests_total{model_name="m",priority_class="batch"} 2.0' in text
    assert 'pagedserve:slo_max_num_seqs{model_name="m"} 8.0' in text


def test_no_shedding_while_the_controller_ramps_its_cap() -> None:
    metrics = EngineMetrics("m")
    slo = SloConfig(ttft_s={"interactive": 0.5}, tpot_s={"interactive": 0.05})
    adm = SloAdmission(slo, metrics.slo)
    # 40 ahead at 10 per s = 4 s: far past the objective, but the seats are still being added
    adm.on_stats(_stats(waiting=40, waiting_batch=0, rate_i=10.0, rate_b=None, ramping=True))
    adm.check(1, "interactive")
    adm.on_stats(_stats(waiting=40, waiting_batch=0, rate_i=10.0, rate_b=None, ramping=False))
    with pytest.raises(RateLimitError):
        adm.check(1, "interactive")


def test_attainment_and_goodput_per_class() -> None:
    metrics = EngineMetrics("m")
    slo = SloConfig(ttft_s={"interactive": 0.5}, tpot_s={"interactive": 0.05, "batch": 0.2})
    adm = SloAdmission(slo, metrics.slo)
    adm.on_finished(FinishedRequestStats("stop", 5, 10, 0.1, 0.01, 1.0, priority_class="interactive"))  # met
    adm.on_finished(FinishedRequestStats("length", 5, 10, 0.9, 0.01, 1.0, priority_class="interactive"))  # TTFT missed
    adm.on_finished(FinishedRequestStats("stop", 5, 10, 9.0, 0.1, 1.0, priority_class="batch"))  # no TTFT objective
    adm.on_finished(FinishedRequestStats("abort", 5, 0, None, None, 1.0))  # cut: counts nowhere
    text = metrics.render().decode()
    assert 'pagedserve:slo_attainment{model_name="m",objective="ttft",priority_class="interactive"} 0.5' in text
    assert 'pagedserve:slo_attainment{model_name="m",objective="tpot",priority_class="interactive"} 1.0' in text
    assert 'pagedserve:slo_attainment{model_name="m",objective="all",priority_class="batch"} 1.0' in text
    assert 'pagedserve:goodput_requests_total{model_name="m"} 2.0' in text


def test_priority_class_from_tenant_or_field() -> None:
    def raw(**state: Any) -> Any:
        return SimpleNamespace(state=SimpleNamespace(**state))

    assert priority_class_of(raw(), None) == "interactive"
    assert priority_class_of(raw(), "batch") == "batch"
    tenant = SimpleNamespace(priority_class="batch")
    assert priority_class_of(raw(principal=tenant), "interactive") == "batch"  # the tenant's class wins
    assert priority_class_of(raw(principal=SimpleNamespace(priority_class="interactive")), "batch") == "batch"


def test_a_prefill_backlog_sheds_even_while_the_cap_ramps() -> None:
    """Few wait for a seat, but the seated requests' prompts are far ahead of the prefill rate
    (the H200's overload: TTFT P50 2.6 s with < 40 waiting): 429, also while the seat cap ramps;
    requests sent since the report add the mean seated prompt each."""
    metrics = EngineMetrics("m")
    slo = SloConfig(ttft_s={"interactive": 2.0, "batch": 10.0}, tpot_s={"interactive": 0.03})
    adm = SloAdmission(slo, metrics.slo)
    stats = _stats(waiting=2, waiting_batch=0, rate_i=50.0, rate_b=None, ramping=True)
    stats.prefill_ahead_interactive, stats.prefill_ahead_batch = 14_000, 14_000
    stats.slo_prefill_rate, stats.slo_mean_prompt_tokens = 10_000.0, 1_000.0
    adm.on_stats(stats)
    # 14,000 tokens / 10,000 per s = 1.4 s <= 0.8 x 2 s: in; the next sees 15,000 (1.5 s): in;
    # then 16,000 = 1.6 s, still not past; then 17,000 = 1.7 s > 1.6 s: 429 (seat wait 5 / 50 s)
    for _ in range(3):
        adm.check(1, "interactive")
    with pytest.raises(RateLimitError) as e:
        adm.check(1, "interactive")
    assert e.value.headers["Retry-After"] == "1"  # 1.7 - 1.6 s of prefill to drain -> 1 s at least
    adm.check(1, "batch")  # its objective (10 s) has room for the same backlog
    text = metrics.render().decode()
    assert 'pagedserve:slo_predicted_queue_delay_seconds{model_name="m",priority_class="interactive"} 1.4' in text
    # without a measured prefill rate the backlog predicts nothing: the seat rule alone decides
    stats.slo_prefill_rate = None
    adm.on_stats(stats)
    for _ in range(10):
        adm.check(1, "interactive")
