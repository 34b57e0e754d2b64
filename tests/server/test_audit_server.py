"""A real server with --api-key and a keyed audit log: every request outcome audited exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from pagedserve.entrypoints.cli import main as cli_main
from pagedserve.ops.auth import key_fingerprint
from tests.server.conftest import start_server

API_KEY = "sk-audit-test-key-123"
AUDIT_KEY = "audit-hmac-key-for-tests-0123456789"


def test_rejections_audited_once_and_shared_client_request_ids(tiny_checkpoints: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "audit.key"
    key_file.write_text(AUDIT_KEY + "\n")
    extra = ["--api-key", API_KEY, "--audit-key-file", str(key_file)]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    # Long enough that request A is still running in the engine when B (same X-Request-Id) arrives.
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    with start_server(tiny_checkpoints["llama"], tmp_path, extra=extra, audit=True) as server:
        assert server.audit_path is not None
        audit_path = server.audit_path
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            r401 = http.post("/v1/completions", json={**body, "max_tokens": 1}, headers={"X-Request-Id": "case-401"})
            r400 = http.post("/v1/completions", json={**body, "max_tokens": -1},
                             headers={**auth, "X-Request-Id": "case-400"})  # fmt: skip
            r404 = http.post("/v1/completions", json={**body, "model": "nope"},
                             headers={**auth, "X-Request-Id": "case-404"})  # fmt: skip
            assert (r401.status_code, r400.status_code, r404.status_code) == (401, 400, 404)
            shared = {**auth, "X-Request-Id": "shared-id"}
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=shared) as a:
                assert a.status_code == 200 and a.headers["x-request-id"] == "shared-id"
                lines = a.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))  # A is in the engine
                b = http.post("/v1/completions", json=body, headers=shared)
                assert b.status_code == 200, b.text  # was a 400: the header was the engine request id
                assert b.headers["x-request-id"] == "shared-id"
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            a_id = json.loads(first.removeprefix("data: "))["id"]
            assert a_id != b.json()["id"]
    # The server has stopped: every line is written and the log closed.
    rows = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert len(rows) == 5  # /health polls are not audited; nothing is audited twice
    by_client: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_client.setdefault(row["client_request_id"], []).append(row)
    assert sorted(by_client) == ["case-400", "case-401", "case-404", "shared-id"]
    for cid, code in (("case-401", 401), ("case-400", 400), ("case-404", 404)):
        (row,) = by_client[cid]
        assert (row["http_status"], row["status"], row["method"], row["path"]) == (
            code, "rejected", "POST", "/v1/completions"
        )  # fmt: skip
        assert row["key_id"] == (None if code == 401 else key_fingerprint(API_KEY))
        assert row["chain"] == "hmac-sha256"
    a_row, b_row = sorted(by_client["shared-id"], key=lambda r: r["arrival_time"])
    assert {a_row["request_id"], b_row["request_id"]} == {a_id, b.json()["id"]}  # distinct audit ids
    assert a_row["status"] == b_row["status"] == "ok" and a_row["completion_tokens"] == 200
    assert a_row["finish_time"] > b_row["arrival_time"]  # they overlapped
    assert len({r["request_id"] for r in rows}) == 5
    checkpoint = json.loads(Path(str(audit_path) + ".checkpoint").read_text())
    assert (checkpoint["seq"], checkpoint["closed"], checkpoint["head"]) == (5, True, rows[-1]["line_hash"])
    assert cli_main(["audit", "verify", str(audit_path), "--key-file", str(key_file)]) == 0
