"""JSON logs with request context, the access log, and secret redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from pagedserve.ops.auth import AuthConfig, Authenticator, AuthMiddleware
from pagedserve.ops.logging import (
    AccessLogMiddleware,
    RedactingFilter,
    configure_logging,
    get_request_id,
    redact,
    request_context,
)

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


@pytest.fixture()
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buf = io.StringIO()
    configure_logging("DEBUG", json=True, stream=buf)
    yield buf
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved_handlers:
        root.addHandler(h)
    root.setLevel(saved_level)


def _records(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line]


def test_json_lines_with_request_context(stream: io.StringIO) -> None:
    log = logging.getLogger("pagedserve.test")
    log.info("outside")
    with request_context("req-42", tenant="acme"):
        assert get_request_id() == "req-42"
        log.warning("step %d done", 3, extra={"num_tokens": 17})
    assert get_request_id() is None
    first, second = _records(stream)
    assert first["msg"] == "outside" and "request_id" not in first and first["level"] == "INFO"
    assert second == {
        "ts": second["ts"], "level": "WARNING", "logger": "pagedserve.test", "msg": "step 3 done",
        "request_id": "req-42", "tenant": "acme", "num_tokens": 17,
    }  # fmt: skip
    assert second["ts"].endswith("+00:00")


def test_exceptions_are_logged_redacted(stream: io.StringIO) -> None:
    try:
        raise RuntimeError(f"upstream said Authorization: Bearer {JWT}")
    except RuntimeError:
        logging.getLogger("x").exception("call failed")
    (rec,) = _records(stream)
    assert "RuntimeError" in rec["exc"] and JWT not in rec["exc"] and "[REDACTED]" in rec["exc"]


@pytest.mark.parametrize(
    "text, secret",
    [
        ("header Bearer abc.def-ghi_123 sent", "abc.def-ghi_123"),
        (f"token {JWT} leaked", JWT),
        ("key sk-proj-abcdefghijklmnop here", "sk-proj-abcdefghijklmnop"),
        ("api_key=supersecret123&x=1", "supersecret123"),
        ('{"api_key": "supersecret123"}', "supersecret123"),
        ("X-API-Key: supersecret123", "supersecret123"),
        ("password=hunter2", "hunter2"),
    ],
)
def test_redact(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and "[REDACTED]" in out


def test_redact_leaves_ordinary_text() -> None:
    text = "prompt_tokens=12 max_tokens=16 tokens: 5 the bearer of news"
    assert redact(text) == text


def test_filter_covers_args_and_extras(stream: io.StringIO) -> None:
    logging.getLogger("x").info("got %s", f"Bearer {JWT}", extra={"header": f"Bearer {JWT}"})
    (rec,) = _records(stream)
    assert JWT not in json.dumps(rec)
    assert rec["msg"] == "got Bearer [REDACTED]" and rec["header"] == "Bearer [REDACTED]"
    (ours,) = [h for h in logging.getLogger().handlers if getattr(h, "_pagedserve_handler", False)]
    assert any(isinstance(f, RedactingFilter) for f in ours.filters)


def test_configure_is_idempotent_and_validates() -> None:
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        configure_logging("INFO", stream=io.StringIO())
        configure_logging("info", json=False, stream=io.StringIO())
        ours = [h for h in root.handlers if getattr(h, "_pagedserve_handler", False)]
        assert len(ours) == 1 and root.level == logging.INFO
        with pytest.raises(ValueError, match="level must be one of"):
            configure_logging("LOUD")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _app(tmp_path: Path) -> FastAPI:
    key_file = tmp_path / "keys"
    key_file.write_text("k1 team-blue\n")
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body = await request.json()
        logging.getLogger("pagedserve.serving").info("inside handler: %d chars", len(body["prompt"]))
        return {"request_id": get_request_id()}

    auth = Authenticator(AuthConfig(api_key_file=str(key_file), use_env=False), environ={})
    app.add_middleware(AuthMiddleware, authenticator=auth)
    app.add_middleware(AccessLogMiddleware)  # outermost: sees the principal the auth layer sets
    return app


PROMPT = "THE SECRET PROMPT TEXT"


def test_access_log_tenant_and_request_id(stream: io.StringIO, tmp_path: Path) -> None:
    client = TestClient(_app(tmp_path))
    resp = client.post(
        "/v1/completions?api_key=leaky",
        json={"prompt": PROMPT},
        headers={"Authorization": "Bearer k1", "X-Request-Id": "client-id-1"},
    )
    assert resp.status_code == 200
    # The internal id is always fresh (the client's header is not unique); the response echoes
    # the client's id, and the logs carry both.
    internal = resp.json()["request_id"]  # the handler sees the context id
    assert len(internal) == 32 and internal != "client-id-1"
    assert resp.headers["x-request-id"] == "client-id-1"
    records = _records(stream)
    inside = next(r for r in records if r["msg"].startswith("inside handler"))
    assert inside["request_id"] == internal
    access = next(r for r in records if r["logger"] == "pagedserve.access")
    assert access["http_method"] == "POST" and access["path"] == "/v1/completions"
    assert access["status"] == 200 and access["tenant"] == "team-blue" and access["latency_ms"] >= 0
    assert access["request_id"] == internal and access["client_request_id"] == "client-id-1"
    again = client.post("/v1/completions", json={"prompt": "x"},
                        headers={"Authorization": "Bearer k1", "X-Request-Id": "client-id-1"})  # fmt: skip
    assert again.headers["x-request-id"] == "client-id-1" and again.json()["request_id"] != internal
    assert PROMPT not in stream.getvalue() and "leaky" not in stream.getvalue()


def test_access_log_generates_ids_and_logs_denials(stream: io.StringIO, tmp_path: Path) -> None:
    client = TestClient(_app(tmp_path))
    resp = client.post(
        "/v1/completions", json={"prompt": PROMPT}, headers={"X-Request-Id": "bad id with spaces"}
    )
    assert resp.status_code == 401
    generated = resp.headers["x-request-id"]
    assert len(generated) == 32 and generated != "bad id with spaces"
    (access,) = [r for r in _records(stream) if r["logger"] == "pagedserve.access"]
    assert access["request_id"] == generated and access["status"] == 401 and access["tenant"] is None
    assert access["client_request_id"] is None
    assert PROMPT not in stream.getvalue()
