"""Output validation on a real server: a tenant whose outputs must match a JSON schema gets
schema-constrained outputs that parse; a forced truncation (max_tokens) is flagged in the response
and counted in the compliance metric."""

from __future__ import annotations

import json

import httpx
import jsonschema

from tests.server.conftest import RunningServer
from tests.tenants.conftest import RISK_SCHEMA, headers, metric_value, metrics

MESSAGES = [{"role": "user", "content": "Score this loan application."}]


def chat(server: RunningServer, **extra: object) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", headers=headers("risk"), timeout=120,
                      json={"model": "tiny", "messages": MESSAGES, "temperature": 0, **extra})  # fmt: skip


def test_schema_outputs_parse_and_truncation_is_flagged_and_counted(tenant_server: RunningServer) -> None:
    for seed in range(2):
        r = chat(tenant_server, max_tokens=48, temperature=1.0, seed=seed)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice  # the grammar ended it, not max_tokens
        jsonschema.validate(json.loads(choice["message"]["content"]), RISK_SCHEMA)
        assert choice["output_validation"] == {"valid": True, "error": None}

    cut = chat(tenant_server, max_tokens=2).json()["choices"][0]  # forced truncation
    assert cut["finish_reason"] == "length"
    assert cut["output_validation"]["valid"] is False
    assert "not valid JSON" in cut["output_validation"]["error"]

    # streamed: the results come in a chunk with no choices before [DONE]
    events = []
    with httpx.stream("POST", tenant_server.v1 + "/chat/completions", headers=headers("risk"), timeout=60,
                      json={"model": "tiny", "messages": MESSAGES, "stream": True, "max_tokens": 2}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"] == []
    assert events[-1]["output_validation"][0]["index"] == 0 and events[-1]["output_validation"][0]["valid"] is False

    # a request asking for another constraint than the tenant's is refused
    bad = chat(tenant_server, max_tokens=4, guided_regex="[a-z]+")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex"

    text = metrics(tenant_server)
    assert metric_value(text, "pagedserve:output_validations_total", tenant="risk", model_name="tiny",
                        result="pass") == 2  # fmt: skip
    assert metric_value(text, "pagedserve:output_validations_total", tenant="risk", result="fail") == 2
    assert metric_value(text, "pagedserve:output_compliance_rate", tenant="risk", model_name="tiny") == 2 / 4
