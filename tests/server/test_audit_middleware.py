"""AuditMiddleware: one audit line per request to an audited route, whoever writes it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from pagedserve.entrypoints.openai.errors import NotFoundError, install_exception_handlers
from pagedserve.ops.audit import AuditLog
from pagedserve.ops.audit_middleware import AuditMiddleware, claim_audit, is_audited, outcome
from pagedserve.ops.audit_verify import verify_audit_log
from pagedserve.ops.auth import AuthConfig, Authenticator, AuthMiddleware, key_fingerprint
from pagedserve.ops.logging import AccessLogMiddleware

KEY = b"middleware-test-key-0123456789"


class Body(BaseModel):
    prompt: str


def _app(log: AuditLog) -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)

    @app.post("/v1/completions")
    async def completions(body: Body, request: Request) -> dict[str, Any]:
        if body.prompt == "missing-model":
            raise NotFoundError("The model `x` does not exist.", param="model")
        if body.prompt == "crash":
            raise RuntimeError("bug")
        # A served request: the handler writes the detailed line itself, claiming it first.
        if claim_audit(request.scope.setdefault("state", {})):
            log.record(request_id="cmpl-" + request.state.request_id, tenant=request.state.principal.tenant,
                       model="tiny", arrival_time=0, finish_time=0, prompt_tokens=5, completion_tokens=2,
                       status="ok", http_status=200, client_request_id=request.state.client_request_id)  # fmt: skip
        return {"ok": True}

    @app.post("/tokenize")
    async def tokenize(body: Body) -> dict[str, int]:
        return {"count": len(body.prompt)}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    auth = Authenticator(AuthConfig(api_keys=["k1"], use_env=False), environ={})
    app.add_middleware(AuthMiddleware, authenticator=auth)
    app.add_middleware(AuditMiddleware, log=log, model="tiny")
    app.add_middleware(AccessLogMiddleware)
    return app


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_outcome_is_audited_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key=KEY)
    client = TestClient(_app(log), raise_server_exceptions=False)
    auth = {"Authorization": "Bearer k1"}
    cases = [
        ("c401", "/v1/completions", {"prompt": "x"}, {}, 401),
        ("c400", "/v1/completions", {"nope": 1}, auth, 400),
        ("c404", "/v1/completions", {"prompt": "missing-model"}, auth, 404),
        ("c404route", "/v1/no-such-route", {"prompt": "x"}, auth, 404),
        ("c500", "/v1/completions", {"prompt": "crash"}, auth, 500),
        ("c200", "/v1/completions", {"prompt": "x"}, auth, 200),
        ("tok", "/tokenize", {"prompt": "abc"}, auth, 200),
    ]
    for cid, route, body, headers, code in cases:
        r = client.post(route, json=body, headers={**headers, "X-Request-Id": cid})
        assert r.status_code == code, (cid, r.text)
        if code != 500:  # a 500 is answered by Starlette's outermost error middleware
            assert r.headers["x-request-id"] == cid
    assert client.get("/health").status_code == 200  # not an audited route
    log.close()
    rows = _rows(path)
    assert sorted(r["client_request_id"] for r in rows) == sorted(c[0] for c in cases)  # once each
    by_id = {r["client_request_id"]: r for r in rows}
    expected = {"http_status": 401, "status": "rejected", "tenant": None, "key_id": None, "method": "POST",
                "path": "/v1/completions", "model": "tiny", "prompt_tokens": 0}  # fmt: skip
    assert {k: by_id["c401"][k] for k in expected} == expected
    assert (by_id["c400"]["http_status"], by_id["c400"]["key_id"]) == (400, key_fingerprint("k1"))
    assert by_id["c404"]["http_status"] == 404 and by_id["c404route"]["path"] == "/v1/no-such-route"
    assert (by_id["c500"]["http_status"], by_id["c500"]["status"]) == (500, "error")
    # The handler's own line, not the middleware's: its token counts are there.
    assert by_id["c200"]["prompt_tokens"] == 5 and by_id["c200"]["request_id"].startswith("cmpl-")
    assert (by_id["tok"]["status"], by_id["tok"]["http_status"]) == ("ok", 200)
    assert len({r["request_id"] for r in rows}) == len(rows)  # internal ids are unique
    assert verify_audit_log(path, key=KEY).ok


def test_helpers() -> None:
    assert is_audited("/v1") and is_audited("/v1/chat/completions") and is_audited("/tokenize")
    assert is_audited("/v1x") and is_audited("//v1/completions") and is_audited("/docs")
    assert not is_audited("/health") and not is_audited("/metrics") and not is_audited("/ping")
    assert [outcome(s) for s in (None, 200, 404, 429, 503)] == ["aborted", "ok", "rejected", "rejected", "error"]
    state: dict[str, Any] = {}
    assert claim_audit(state) and not claim_audit(state) and not claim_audit(state)


def test_cancelled_request_gets_the_cut_status(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)

    async def cancelled(scope: Any, receive: Any, send: Any) -> None:
        raise asyncio.CancelledError  # what a client disconnect or a shutdown's task.cancel() delivers

    mw = AuditMiddleware(cancelled, log=log, model="tiny")
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    for cut in ("aborted", "shutdown"):
        if cut == "shutdown":
            log.begin_shutdown()
        with pytest.raises(asyncio.CancelledError):  # re-raised after the line is written
            asyncio.run(mw({**scope, "state": {"request_id": cut}}, None, None))  # type: ignore[arg-type]
    log.close()
    rows = _rows(path)
    assert [(r["request_id"], r["status"], r["http_status"]) for r in rows] == [
        ("aborted", "aborted", None), ("shutdown", "shutdown", None)
    ]


def test_handler_audit_is_once_and_honours_shutdown(tmp_path: Path) -> None:
    from starlette.requests import Request as StarletteRequest

    from pagedserve.entrypoints.openai.serving_engine import AuditInfo, OpenAIServing, ServerState

    log = AuditLog(tmp_path / "audit.jsonl")
    serving = OpenAIServing(ServerState(served_model_names=["tiny"], max_model_len=64, audit=log))

    def request(rid: str) -> StarletteRequest:
        return StarletteRequest({
            "type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b"",
            "scheme": "http", "server": ("127.0.0.1", 80), "root_path": "",
            "state": {"request_id": rid, "client_request_id": "client-" + rid},
        })  # fmt: skip

    served = request("a")
    info = AuditInfo("chatcmpl-a", 1.0, "hello", prompt_tokens=3, status="ok")
    serving.audit(served, info)
    serving.audit(served, info)  # a second call for the same request writes nothing
    log.begin_shutdown()
    cut = request("b")
    serving.audit(cut, AuditInfo("chatcmpl-b", 2.0, "hi", prompt_tokens=1, status="aborted"))
    log.close()
    serving.audit(request("c"), AuditInfo("chatcmpl-c", 3.0, None))  # after close: logged, not raised
    rows = _rows(tmp_path / "audit.jsonl")
    assert [(r["request_id"], r["status"], r["http_status"], r["client_request_id"]) for r in rows] == [
        ("chatcmpl-a", "ok", 200, "client-a"), ("chatcmpl-b", "shutdown", None, "client-b"),
    ]  # fmt: skip
    assert rows[0]["path"] == "/v1/chat/completions" and rows[0]["model"] == "tiny"


def test_flags_build_the_audit_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedserve.entrypoints.openai.cli_args import parse_args
    from pagedserve.ops.audit_middleware import audit_log_from_args

    monkeypatch.delenv("PAGEDSERVE_AUDIT_KEY", raising=False)
    defaults = parse_args([])
    assert (defaults.jwt_max_lifetime, defaults.audit_key_file, defaults.audit_checkpoint_interval) == (
        86400, None, 1
    )  # fmt: skip
    assert audit_log_from_args(defaults) is None
    key_file = tmp_path / "k"
    key_file.write_bytes(KEY)
    args = parse_args(["--audit-log", str(tmp_path / "a.jsonl"), "--audit-key-file", str(key_file),
                       "--audit-checkpoint-interval", "5", "--jwt-max-lifetime", "0"])  # fmt: skip
    log = audit_log_from_args(args)
    assert log is not None and log.key == KEY and log.checkpoint_interval == 5
    log.close()
    with pytest.raises(ValueError, match="needs --audit-log"):
        audit_log_from_args(parse_args(["--audit-key-file", str(key_file)]))
    monkeypatch.setenv("PAGEDSERVE_AUDIT_KEY", "env-key-0123456789abcdef")
    env_log = audit_log_from_args(parse_args(["--audit-log", str(tmp_path / "b.jsonl")]))
    assert env_log is not None and env_log.key == b"env-key-0123456789abcdef"
    env_log.close()
    with pytest.raises(SystemExit):
        parse_args(["--audit-checkpoint-interval", "0"])
