"""The dashboard, the alert rules and the autoscaling rules use only metrics that a RUNNING server
and router export. The server is started the way a pod starts it: `--model s3://...` against the
loopback S3 server, with `--model-public-key`; a request goes through it directly and one through a
real router; both /metrics pages are scraped and every PromQL query of the assets is parsed
(promql-parser) and its metric and label names compared with the scrape."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pagedserve.config import EngineArgs
from pagedserve.model_repo import ModelVerificationError, push
from pagedserve.model_repo.signing import generate_keypair
from tests.deploy.promql_names import DEPLOY, asset_expressions, exported, selectors, unknown_names
from tests.router.conftest import region, running_router, wait_for
from tests.server.conftest import free_port, start_server

HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


@pytest.fixture(scope="module")
def signed_s3_model(s3_server: dict[str, str], tiny_checkpoints: Any,
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:  # fmt: skip
    import boto3

    tmp = tmp_path_factory.mktemp("s3_model")
    boto3.client("s3").create_bucket(Bucket="deploy-metrics")
    priv, pub = generate_keypair(tmp / "model.key")
    url = "s3://deploy-metrics/tiny-llama/v1"
    # push writes SHA256SUMS beside the model: sign a copy, never the session's shared checkpoint
    model = shutil.copytree(tiny_checkpoints["llama"], tmp / "llama")
    push(str(model), url, str(priv), progress=False)
    return url, str(pub), tmp


@pytest.fixture(scope="module")
def scrapes(signed_s3_model: tuple[str, str, Path]) -> Iterator[dict[str, str]]:
    url, pub, tmp = signed_s3_model
    flags = ["--model-public-key", pub, "--download-dir", str(tmp / "cache")]
    with start_server(url, tmp, extra=flags) as server:
        comp = {"model": "tiny", "prompt": "Hello there", "max_tokens": 4, "temperature": 0.0}
        assert httpx.post(server.v1 + "/completions", json=comp, timeout=60).status_code == 200
        with httpx.stream("POST", server.v1 + "/completions", json={**comp, "stream": True}, timeout=60) as r:
            assert r.status_code == 200 and list(r.iter_lines())
        assert httpx.post(server.v1 + "/completions", json={**comp, "max_tokens": -1}).status_code == 400
        # The image's HEALTHCHECK script against the real /health, and against nothing.
        env = {**os.environ, "PAGEDSERVE_PORT": server.base_url.rsplit(":", 1)[1]}
        assert subprocess.run([sys.executable, str(HEALTHCHECK)], env=env).returncode == 0
        env["PAGEDSERVE_PORT"] = str(free_port())
        assert subprocess.run([sys.executable, str(HEALTHCHECK)], env=env).returncode == 1
        # A router: region a is down (nothing listens), region b is the server.
        config = {"regions": [region("a", 0, f"http://127.0.0.1:{free_port()}"), region("b", 1, server.base_url)]}
        with running_router(config, tmp) as (_, router_url):
            wait_for(lambda: httpx.get(router_url + "/health").status_code == 200, what="router healthy")
            routed = httpx.post(router_url + "/v1/completions", json=comp, timeout=60)
            assert routed.status_code == 200 and routed.headers["x-pagedserve-region"] == "b"
            router_text = httpx.get(router_url + "/metrics").text
        server_text = httpx.get(server.base_url + "/metrics").text
        server_log = server.log()
    yield {"server": server_text, "router": router_text, "server_log": server_log}


def test_server_started_from_the_signed_s3_model(scrapes: dict[str, str], signed_s3_model: tuple[str, str, Path]) -> None:
    url, _, tmp = signed_s3_model
    assert 'model_name="tiny"' in scrapes["server"]
    cached = list((tmp / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file() and (cached[0] / "SHA256SUMS.sig").is_file()
    assert "signature verified" in scrapes["server_log"]


def test_assets_use_only_exported_metrics(scrapes: dict[str, str]) -> None:
    series = {**exported(scrapes["server"]), **exported(scrapes["router"])}
    exprs = asset_expressions()
    assert len(exprs) > 40
    problems = unknown_names(exprs, series)
    assert not problems, "\n".join(problems)
    # What the issue asks the dashboard and the alerts to show, by metric.
    used = {name for _, e in exprs for name, _ in selectors(e)}
    for name in ("http_requests_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:time_per_output_token_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:iteration_tokens_total_sum", "DCGM_FI_DEV_GPU_UTIL",
                 "pagedserve_router_failovers_total", "pagedserve_router_backend_up"):  # fmt: skip
        assert name in used, name


def test_the_name_check_catches_a_typo_and_a_wrong_label(scrapes: dict[str, str]) -> None:
    """The control: the same comparison flags a misspelt metric, a label the series lacks, and bad PromQL."""
    series = exported(scrapes["server"])
    bad = [("typo", "sum(vllm:num_requests_waitin)"), ("label", 'vllm:num_requests_waiting{finished_reason="stop"}'),
           ("syntax", "sum(rate(vllm:num_preemptions_total[5m])")]  # fmt: skip
    problems = unknown_names(bad, series)
    assert len(problems) == 3 and "not exported" in problems[0] and "finished_reason" in problems[1]
    assert "not valid PromQL" in problems[2]


def test_hpa_metrics_come_from_adapter_rules_over_exported_series() -> None:
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-adapter-values.yaml").read_text())

    served = set()
    for rule in adapter["rules"]["custom"]:
        series = rule["seriesQuery"].split("{")[0]
        pattern = rule["name"]["matches"]
        served.add(re.sub(pattern, rule["name"]["as"].replace("${1}", r"\1"), series))
    base = yaml.safe_load((DEPLOY / "k8s" / "base" / "server-hpa.yaml").read_text())
    gpu = yaml.safe_load((DEPLOY / "k8s" / "overlays" / "gpu" / "hpa-gpu.yaml").read_text())
    wanted = {m["pods"]["metric"]["name"] for m in base["spec"]["metrics"]} | {gpu[0]["value"]["pods"]["metric"]["name"]}
    assert wanted == served == {"vllm_num_requests_waiting", "vllm_kv_cache_usage_perc", "pagedserve_gpu_utilization"}


def test_dashboard_is_importable_grafana_json() -> None:
    dash = json.loads((DEPLOY / "grafana" / "pagedserve-dashboard.json").read_text())
    assert dash["uid"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]


def test_a_tampered_s3_model_never_reaches_the_engine(s3_server: dict[str, str], tiny_checkpoints: Any,
                                                      tmp_path: Path) -> None:  # fmt: skip
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="deploy-tampered")
    priv, pub = generate_keypair(tmp_path / "k")
    model = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "llama")  # push writes SHA256SUMS into it
    push(str(model), "s3://deploy-tampered/m", str(priv), progress=False)
    s3.put_object(Bucket="deploy-tampered", Key="m/config.json", Body=b'{"architectures": ["Evil"]}')
    args = EngineArgs(model="s3://deploy-tampered/m", model_public_key=str(pub), download_dir=str(tmp_path / "c"))
    with pytest.raises(ModelVerificationError, match="model file 'config.json' does not match SHA256SUMS"):
        args.create_engine_config()
