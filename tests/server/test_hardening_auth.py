"""Issue 8 items 1, 2 (auth part), 12 (CORS, CLI): a real server with --root-path, API keys and
HS256 JWTs. Every route but the public probes needs credentials, whatever the path spelling."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import openai
import pytest

from tests.server.conftest import RunningServer, start_server

API_KEY = "sk-hardening-key-0123456789"
JWT_SECRET = "jwt-secret-for-hardening-tests-0123456789"
AUDIENCE = "pagedserve-hardening"
ROOT = "/api"
ORIGIN = "https://app.example"
COMPLETION = {"model": "tiny", "prompt": "the model", "max_tokens": 1}


@pytest.fixture(scope="module")
def server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("hardening_auth")
    extra = ["--root-path", ROOT, "--api-key", API_KEY, "--jwt-secret", JWT_SECRET, "--jwt-audience", AUDIENCE,
             "--allowed-origins", json.dumps([ORIGIN])]  # fmt: skip
    with start_server(tiny_checkpoints["llama"], tmp, extra=extra) as s:
        yield s


def token(**overrides: Any) -> str:
    claims: dict[str, Any] = {"sub": "alice", "tenant": "acme", "aud": AUDIENCE, "exp": int(time.time()) + 300}
    claims.update(overrides)
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def raw_request(server: RunningServer, method: str, target: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:  # fmt: skip
    """One request with the request-target sent byte for byte (httpx would normalise it)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close",
             f"Content-Length: {len(body)}", "Content-Type: application/json"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


BODY = json.dumps(COMPLETION).encode()
# Spellings of the completions route (and of public paths wrapping it) that once slipped past a
# prefix match; with the root path in front and without it.
SPELLINGS = [
    "/v1/completions", ROOT + "/v1/completions", "//v1/completions", "/v1//completions", "/v1/completions/",
    "/v1/%63ompletions", "/%761/completions", "/V1/COMPLETIONS", "/v1/./completions", "/health/../v1/completions",
    "/metrics/../v1/completions", ROOT + "/health/../v1/completions", "/v1/completions?x=/health", "/health/",
    "/HEALTH", "/v1/completions%00", "/v1/completions;/health", ROOT + "//v1/completions",
]  # fmt: skip


@pytest.mark.parametrize("target", SPELLINGS)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Bearer " + "x.y.z", "Basic " + API_KEY])
def test_no_spelling_bypasses_auth(server: RunningServer, target: str, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    status, payload = raw_request(server, "POST", target, BODY, headers)
    assert status == 401, (target, payload[:200])
    assert json.loads(payload)["error"]["type"] == "authentication_error"


def test_proxy_headers_do_not_open_routes(server: RunningServer) -> None:
    spoof = {"X-Forwarded-Prefix": "/health", "X-Original-URL": "/health", "X-Rewrite-URL": "/health",
             "X-Forwarded-Path": "/health", "X-Forwarded-For": "127.0.0.1", "X-Script-Name": ROOT}  # fmt: skip
    status, _ = raw_request(server, "POST", "/v1/completions", BODY, spoof)
    assert status == 401


def test_keys_and_jwts_work_under_root_path(server: RunningServer) -> None:
    for credential in (API_KEY, token()):
        sdk = openai.OpenAI(base_url=server.v1, api_key=credential, max_retries=0, timeout=60)
        assert sdk.completions.create(model="tiny", prompt="the model", max_tokens=1).choices[0].text is not None
        assert [m.id for m in sdk.models.list()] == ["tiny"]
    for bad in (token(exp=int(time.time()) - 60), token(aud="someone-else"), token()[:-4] + "AAAA"):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.v1, api_key=bad, max_retries=0).completions.create(
                model="tiny", prompt="x", max_tokens=1
            )


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenize_routes_need_a_key(server: RunningServer, path: str) -> None:
    body = {"prompt": "hello world"} if path == "/tokenize" else {"tokens": [1, 2, 3]}
    assert httpx.post(server.base_url + path, json=body).status_code == 401
    assert httpx.post(server.base_url + path, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    for credential in (API_KEY, token()):
        ok = httpx.post(server.base_url + path, json=body, headers={"Authorization": f"Bearer {credential}"})
        assert ok.status_code == 200, ok.text


def test_public_allowlist_and_protected_docs(server: RunningServer) -> None:
    base = server.base_url
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + "/version").json()["version"]
    assert "vllm:num_requests_running" in httpx.get(base + "/metrics").text
    for path in ("/openapi.json", "/docs", "/redoc", "/v1/models", "/nonexistent"):
        assert httpx.get(base + path).status_code == 401, path
    authed = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(base + "/openapi.json", headers=authed).status_code == 200


def test_request_chat_template_refused_without_trust_flag(server: RunningServer) -> None:
    authed = {"Authorization": f"Bearer {API_KEY}"}
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        ("/tokenize", {"messages": messages, "chat_template": "{{ messages[0].content }}"}),
        ("/tokenize", {"messages": messages, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}),
        ("/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 1,
                                  "chat_template": "{{ messages[0].content }}"}),
    ]  # fmt: skip
    for path, body in cases:
        r = httpx.post(server.base_url + path, json=body, headers=authed, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "chat_template"
        assert "--trust-request-chat-template" in r.json()["error"]["message"]
    # the server's own template still renders
    ok = httpx.post(server.base_url + "/tokenize", json={"messages": messages}, headers=authed)
    assert ok.status_code == 200 and ok.json()["count"] > 0


def test_cors_preflight_and_headers_on_errors(server: RunningServer) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    r = httpx.options(server.v1 + "/completions", headers=preflight)
    assert r.status_code == 200  # answered by CORS without credentials
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    other = httpx.options(server.v1 + "/completions", headers=preflight | {"Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    denied = httpx.post(server.v1 + "/completions", json=COMPLETION, headers={"Origin": ORIGIN})
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == ORIGIN  # the browser can read the 401


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from pagedserve.entrypoints.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


def test_cli_help_on_stdout_and_version() -> None:
    import pagedserve

    for flag in ("--help", "-h"):
        out = _cli(flag)
        assert out.returncode == 0 and "usage: pagedserve" in out.stdout and out.stderr == ""
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == pagedserve.__version__
    nothing = _cli()
    assert nothing.returncode == 2 and "usage" in nothing.stderr and nothing.stdout == ""
    serve_help = _cli("serve", "--help")
    assert serve_help.returncode == 0
    for flag in ("--max-request-body-bytes", "--trust-request-chat-template", "--allowed-origins"):
        assert flag in serve_help.stdout
