"""One real server (loopback, tiny llama, CPU) for the tenant tests, with a key file and a tenant
config giving every test its own tenants, so that the tests' counters never mix:

    limited  requests_per_minute 5            tokens   tokens_per_minute 100
    free     no limits                        capped   max_concurrent 3, max_tokens 8, models [tiny]
    salt_a / salt_b   own cache salts         shared_1 / shared_2   cache_group "public"
    clinic   deidentify mask (a request may ask "reversible"), an MRN pattern; cache_group "ward"
    ward     no de-identification, cache_group "ward": it sees clinic's cached blocks
    risk     outputs must match a JSON schema     nomodel  may not use the served model
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import RunningServer, start_server

RISK_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 9}},
               "required": ["score"], "additionalProperties": False}  # fmt: skip
KEY_FILE = """\
# KEY TENANT [policy fields]
sk-limited limited rpm=5
sk-tokens tokens tpm=100
sk-free free
sk-capped capped concurrency=3 max_tokens=8 models=tiny
sk-salt-a salt_a
sk-salt-b salt_b
sk-shared-1 shared_1 cache_group=public
sk-shared-2 shared_2 cache_group=public
sk-clinic clinic cache_group=ward
sk-ward ward cache_group=ward
sk-risk risk
sk-nomodel nomodel models=another-model
"""
TENANT_CONFIG = {
    "tenants": {
        "clinic": {"deidentify": "mask", "mrn_patterns": [r"\bHN-(?P<value>\d{6})\b"]},
        "risk": {"output": {"json_schema": RISK_SCHEMA}, "priority_class": "batch"},
    },
}


@pytest.fixture(scope="package")
def tenant_server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys.txt"
    keys.write_text(KEY_FILE)
    config = tmp / "tenants.json"
    config.write_text(json.dumps(TENANT_CONFIG))
    extra = ["--api-key-file", str(keys), "--tenant-config", str(config), "--enable-log-requests",
             "--log-level", "DEBUG", "--max-num-seqs", "8"]  # fmt: skip
    with start_server(tiny_checkpoints["llama"], tmp, extra=extra, audit=True) as server:
        yield server


def headers(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer sk-{tenant.replace('_', '-')}"}


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([^\s{]+)(?:\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def metrics(server: RunningServer) -> str:
    return httpx.get(server.base_url + "/metrics", timeout=10).text


def wait_metric(server: RunningServer, name: str, expected: float, **labels: str) -> float:
    """Counters updated when a response has been sent (the lease's end) may trail the response by
    a loop turn: poll until the value is reached (or give the last value for the assertion)."""
    value = metric_value(metrics(server), name, **labels)
    for _ in range(100):
        if value == expected:
            break
        time.sleep(0.05)
        value = metric_value(metrics(server), name, **labels)
    return value


def audit_lines(server: RunningServer) -> list[dict[str, Any]]:
    assert server.audit_path is not None
    return [json.loads(line) for line in Path(server.audit_path).read_text().splitlines() if line.strip()]
