"""Issue 8 items 2, 4, 12: bounded chat templates and prompts, body size/time, prompt count,
concurrency, slow headers, client disconnects, log floods. A real server with small limits
(and --trust-request-chat-template, so pathological templates reach the renderer), plus unit
tests of the middleware, the render deadline and the log filter."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import jinja2.sandbox
import openai
import pytest
from fastapi import FastAPI, Request

from pagedserve.entrypoints.openai.errors import install_exception_handlers
from pagedserve.entrypoints.openai.prompt_bounds import TemplateTimeout, call_with_deadline
from pagedserve.ops.conn_limits import RepeatFilter, raise_nofile_limit
from pagedserve.ops.http_limits import HTTPLimits, HTTPLimitsMiddleware
from tests.server.conftest import RunningServer, start_server

MAX_PROMPTS = 8
MAX_CONCURRENT = 3
BODY_TIMEOUT_S = 5
NESTED_2 = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
NESTED_3 = ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
            "{{ k }}{% endfor %}{% endfor %}{% endfor %}")  # fmt: skip
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("hardening_limits")
    extra = ["--trust-request-chat-template", "--chat-template-timeout", "1.5",
             "--max-prompts-per-request", str(MAX_PROMPTS), "--max-concurrent-requests", str(MAX_CONCURRENT),
             "--request-body-timeout", str(BODY_TIMEOUT_S), "--header-read-timeout", "2"]  # fmt: skip
    with start_server(tiny_checkpoints["llama"], tmp, extra=extra) as s:
        yield s


def _addr(server: RunningServer) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ", 2)[1]), {k.lower(): v for k, v in headers.items()}, body


def race(bad: Callable[[], httpx.Response], good: Callable[[], httpx.Response]) -> tuple[httpx.Response, list[int]]:
    """Runs `bad` in a thread and `good` back to back until `bad` returns. Returns bad's response
    and the statuses of the good requests that completed while bad was still pending (ordering
    only: a good request counts if it finished before bad's response arrived)."""
    done = threading.Event()
    result: list[httpx.Response] = []

    def run_bad() -> None:
        try:
            result.append(bad())
        finally:
            done.set()

    thread = threading.Thread(target=run_bad)
    thread.start()
    before: list[int] = []
    while not done.is_set():
        status = good().status_code
        if not done.is_set():
            before.append(status)
    thread.join()
    return result[0], before


def test_pathological_template_is_cut_off_while_others_complete(server: RunningServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=120) as bad_http, \
            httpx.Client(base_url=server.base_url, timeout=120) as good_http:  # fmt: skip
        turn = [0]

        def good() -> httpx.Response:  # alternately the server's template (pool) and a plain prompt
            turn[0] += 1
            body: dict[str, Any] = {"messages": MESSAGES} if turn[0] % 2 else {"prompt": "hello there"}
            return good_http.post("/tokenize", json=body)

        bad, before = race(
            lambda: bad_http.post("/tokenize", json={"messages": MESSAGES, "chat_template": NESTED_2}), good
        )
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "chat_template"
    assert "did not finish" in bad.json()["error"]["message"]
    assert len(before) >= 3 and set(before) == {200}  # served while the bad render was running


def test_three_nested_loops_and_chat_route(server: RunningServer) -> None:
    sdk = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1,  # type: ignore[arg-type]
                                    extra_body={"chat_template": NESTED_3})  # fmt: skip
    assert "did not finish" in str(err.value)
    # A trusted request template that behaves renders fine, and the pool is free again.
    ok = sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1,  # type: ignore[arg-type]
                                     extra_body={"chat_template": "{{ messages[0].content }}"})  # fmt: skip
    assert ok.usage is not None and ok.usage.prompt_tokens >= 1


def test_huge_prompt_is_refused_while_others_complete(server: RunningServer) -> None:
    huge = "hello world " * (10_000_000 // 12)  # 10 MB
    with httpx.Client(base_url=server.base_url, timeout=120) as bad_http, \
            httpx.Client(base_url=server.base_url, timeout=120) as good_http:  # fmt: skip
        bad, before = race(lambda: bad_http.post("/tokenize", json={"prompt": huge}),
                           lambda: good_http.post("/tokenize", json={"prompt": "hello"}))  # fmt: skip
    assert bad.status_code == 400 and "--max-prompt-chars" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "prompt"
    assert len(before) >= 1 and set(before) == {200}
    r = httpx.post(server.v1 + "/completions", json={"model": "tiny", "prompt": huge, "max_tokens": 1}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_oversized_body_is_413_from_content_length(server: RunningServer) -> None:
    with socket.create_connection(_addr(server), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200000000\r\n\r\n{")  # fmt: skip
        status, headers, body = _read_response(sock)  # answered without reading the 200 MB
    assert status == 413 and headers["connection"] == "close"
    err = json.loads(body)["error"]
    assert err["code"] == 413 and "--max-request-body-bytes" in err["message"]


def test_too_many_prompts_is_400(server: RunningServer) -> None:
    url = server.v1 + "/completions"
    for prompt, n in ((["hi"] * 100_000, 1), (["hi"] * (MAX_PROMPTS + 1), 1), (["hi"] * 3, 3)):
        r = httpx.post(url, json={"model": "tiny", "prompt": prompt, "n": n, "max_tokens": 1}, timeout=60)
        assert r.status_code == 400, r.text
        assert "--max-prompts-per-request" in r.json()["error"]["message"]
    ok = httpx.post(url, json={"model": "tiny", "prompt": ["hi"] * 2, "n": 2, "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
    chat = {"model": "tiny", "messages": MESSAGES, "n": MAX_PROMPTS + 1, "max_tokens": 1}
    r = httpx.post(server.v1 + "/chat/completions", json=chat, timeout=60)
    assert r.status_code == 400 and "--max-prompts-per-request" in r.json()["error"]["message"]


def _wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw: {what}")
        time.sleep(0.05)


def test_concurrency_limit_429_then_body_timeout_408(server: RunningServer) -> None:
    held = [socket.create_connection(_addr(server), timeout=60) for _ in range(MAX_CONCURRENT)]
    try:
        for sock in held:  # headers promise a body that never comes: each request stays in flight
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")  # fmt: skip
        seen: list[httpx.Response] = []

        def refused() -> bool:
            seen.append(httpx.get(server.v1 + "/models", timeout=30))
            return seen[-1].status_code == 429

        _wait_for(refused, "a 429 with all slots held")
        err = seen[-1].json()["error"]
        assert err["type"] == "overloaded_error" and "--max-concurrent-requests" in err["message"]
        assert seen[-1].headers["retry-after"] == "1"
        assert httpx.get(server.base_url + "/health").status_code == 200  # probes are exempt
        for sock in held:  # the body never completes: 408 once --request-body-timeout passes
            status, headers, body = _read_response(sock)
            assert status == 408 and headers["connection"] == "close"
            assert "--request-body-timeout" in json.loads(body)["error"]["message"]
    finally:
        for sock in held:
            sock.close()
    _wait_for(lambda: httpx.get(server.v1 + "/models").status_code == 200, "slots freed")


def test_slow_headers_are_cut_off(server: RunningServer) -> None:
    with socket.create_connection(_addr(server), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert sock.recv(1024) == b""  # the server closed it (--header-read-timeout), not our timeout


def _log_records(server: RunningServer) -> list[dict[str, Any]]:
    out = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def test_client_disconnect_is_499_not_500(server: RunningServer) -> None:
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 240, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        # 240 decode steps cannot finish within 50 ms on any CPU: the client is gone first.
        httpx.post(server.v1 + "/completions", json=body, timeout=httpx.Timeout(60, read=0.05))

    def logged_499() -> bool:
        return any(r.get("path") == "/v1/completions" and r.get("status") == 499 for r in _log_records(server))

    _wait_for(logged_499, "a 499 access line")
    lines = [line for line in httpx.get(server.base_url + "/metrics").text.splitlines()
             if line.startswith("http_requests_total{") and 'handler="/v1/completions"' in line]  # fmt: skip
    assert any('status="4xx"' in line and float(line.rsplit(" ", 1)[1]) >= 1 for line in lines), lines
    assert not [line for line in lines if 'status="5xx"' in line]
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    _wait_for(lambda: 'vllm:num_requests_running{model_name="tiny"} 0.0' in httpx.get(
        server.base_url + "/metrics").text, "the aborted request freed")  # fmt: skip


def test_cors_defaults_allow_any_origin(server: RunningServer) -> None:
    r = httpx.options(server.v1 + "/chat/completions",
                      headers={"Origin": "https://x.example", "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


# ---------------------------------------------------------------------------- units


def _limits_app(limits: HTTPLimits) -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    app.add_middleware(HTTPLimitsMiddleware, limits=limits)  # type: ignore[arg-type]
    return app


def _post(app: FastAPI, content: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/echo", content=content, headers=headers)

    return asyncio.run(go())


def test_body_limit_counts_streamed_chunks() -> None:
    app = _limits_app(HTTPLimits(max_body_bytes=1000))

    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"x" * 300

    assert _post(app, chunks(3)).json() == {"bytes": 900}  # chunked, no Content-Length: counted
    too_big = _post(app, chunks(4))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == 413
    assert _post(app, b"x" * 1001).status_code == 413  # Content-Length path


def test_body_read_timeout_is_408() -> None:
    app = _limits_app(HTTPLimits(body_timeout_s=0.2))

    async def stalls() -> AsyncIterator[bytes]:
        yield b"{"
        await asyncio.Event().wait()  # never sends the rest
        yield b"}"

    r = _post(app, stalls())
    assert r.status_code == 408 and r.json()["error"]["code"] == 408


def test_render_deadline_interrupts_jinja_loops() -> None:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    template = env.from_string(NESTED_2)
    previous = sys.gettrace()
    with pytest.raises(TemplateTimeout):
        call_with_deadline(lambda: template.render(), 0.2)
    assert sys.gettrace() is previous  # the thread's tracer (coverage, debugger) is restored
    assert call_with_deadline(lambda: env.from_string("{% for i in range(3) %}{{ i }}{% endfor %}").render(), 5) == "012"


def test_repeat_filter_collapses_floods() -> None:
    clock = [100.0]
    filt = RepeatFilter(burst=3, period_s=1.0, clock=lambda: clock[0])

    def rec(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", level, __file__, 1, msg, None, None)

    passed = [filt.filter(rec("accept failed: too many open files")) for _ in range(1000)]
    assert passed.count(True) == 3
    assert filt.filter(rec("another error"))  # a different message has its own budget
    assert all(filt.filter(rec("GET /health 200", logging.INFO)) for _ in range(100))  # info: never
    clock[0] += 1.0
    later = rec("accept failed: too many open files")
    assert filt.filter(later)
    assert "[997 similar messages suppressed]" in later.getMessage()


def test_nofile_soft_limit_raised_to_hard() -> None:
    soft, hard = raise_nofile_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
    assert soft == (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20))
