"""How a server stops (entrypoints/openai/lifecycle.py), each test on its own real server:

    SIGTERM, long --shutdown-timeout -> draining (/health 503, new requests 503), the stream runs
                                        to its end, exit 0
    SIGTERM, --shutdown-timeout 0    -> the stream ends with an error event, audited "shutdown", exit 0
    SIGTERM twice                    -> the second one cuts at once
    engine SIGKILLed                 -> in-flight requests fail, the server exits 1
                                        (test_api_server_failures.py)
    engine SIGKILLed, --restart-engine -> in-flight requests fail, a new engine serves again;
                                        past --max-engine-restarts the server exits 1
    server SIGKILLed                 -> its engine process exits too (no orphan)
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import RunningServer, start_server, wait_healthy

EXIT_WAIT_S = 90.0  # generous: 2 shared CPU cores
LONG = {"model": "tiny", "prompt": "the model", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
# The cut tests need a stream that cannot end before the signal is handled, even on a fast idle
# machine: 2000 tokens at a 2048-token context (the tiny llama's positions), not 240 at 256.
LONGER_CONTEXT = ["--max-model-len", "2048"]
LONGER = {**LONG, "max_tokens": 2000}


def stream_events(server: RunningServer, body: dict[str, Any], on_first: Callable[[], None]) -> list[str]:
    """The `data:` lines of a streamed completion; `on_first` runs right after the first one."""
    events: list[str] = []
    with httpx.stream("POST", server.v1 + "/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 1:
                on_first()
    return events


def errors_in(events: list[str]) -> list[dict[str, Any]]:
    return [json.loads(e)["error"] for e in events if e.startswith("{") and '"error"' in e]


def wait_exit(server: RunningServer) -> int:
    code = server.proc.wait(EXIT_WAIT_S)
    assert code is not None
    return code


def audit_lines(server: RunningServer) -> list[dict[str, Any]]:
    assert server.audit_path is not None
    return [json.loads(line) for line in server.audit_path.read_text().splitlines() if line.strip()]


def process_gone(pid: int) -> bool:
    """Exited: no /proc entry, or a zombie nobody reaped yet (it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def server_factory(tiny_checkpoints: Any, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    with_servers: list[Any] = []

    def make(extra: list[str], audit: bool = False) -> RunningServer:
        cm = start_server(tiny_checkpoints["llama"], tmp_path, extra=extra, audit=audit)
        with_servers.append(cm)
        return cm.__enter__()

    yield make
    for cm in with_servers:
        cm.__exit__(None, None, None)


def test_sigterm_drains_a_stream_to_its_end(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(["--shutdown-timeout", "300"], audit=True)
    during: dict[str, httpx.Response] = {}

    def sigterm_then_probe() -> None:
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the signal is handled on the server's event loop
            health = httpx.get(server.base_url + "/health", timeout=10)
            if health.status_code == 503:
                break
            time.sleep(0.02)
        during["health"] = health
        during["new"] = httpx.post(server.v1 + "/completions", json={**LONG, "max_tokens": 4}, timeout=30)

    body = {**LONG, "stream_options": {"include_usage": True}}
    events = stream_events(server, body, sigterm_then_probe)

    assert during["health"].status_code == 503 and during["health"].json() == {"status": "draining"}
    assert during["new"].status_code == 503
    assert during["new"].json()["error"]["type"] == "service_unavailable_error"
    assert not errors_in(events), events[-3:]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == LONG["max_tokens"]  # every token arrived
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "length"
    assert wait_exit(server) == 0
    statuses = {line["request_id"]: line["status"] for line in audit_lines(server)}
    assert statuses[chunks[0]["id"]] == "ok"


def test_sigterm_past_shutdown_timeout_cuts_with_error_event(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(["--shutdown-timeout", "0", *LONGER_CONTEXT], audit=True)
    with ThreadPoolExecutor(1) as pool:
        plain: Future[httpx.Response] = pool.submit(
            httpx.post, server.v1 + "/completions", json=LONGER, timeout=120
        )

        def sigterm_once_both_run() -> None:
            # Both requests admitted first: a request still on its way in would be refused with
            # a 503 (audited "error") instead of cut, which is another test's subject.
            running = 'vllm:num_requests_running{model_name="tiny"} 2.0'
            deadline = time.monotonic() + EXIT_WAIT_S
            while running not in httpx.get(server.base_url + "/metrics", timeout=10).text:
                assert time.monotonic() < deadline, "the plain request never started"
                time.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)

        events = stream_events(server, LONGER, sigterm_once_both_run)
        other = plain.result()

    errors = errors_in(events)
    assert len(errors) == 1 and errors[0]["code"] == 503, events[-3:]
    assert "shut down" in errors[0]["message"]
    assert events[-1] == "[DONE]" and events[-2].startswith('{"error"')
    assert other.status_code == 503 and other.json()["error"]["type"] == "service_unavailable_error"
    assert wait_exit(server) == 0
    stream_id = json.loads(events[0])["id"]
    statuses = {line["request_id"]: line["status"] for line in audit_lines(server)}
    assert statuses[stream_id] == "shutdown"
    assert list(statuses.values()) == ["shutdown", "shutdown"], statuses  # the plain request too


def test_second_sigterm_cuts_at_once(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(["--shutdown-timeout", "300", *LONGER_CONTEXT])

    def sigterm_twice() -> None:
        # Two signals sent back to back coalesce into one (POSIX does not queue them): send the
        # second only once the first is seen to have started the drain.
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + EXIT_WAIT_S
        while httpx.get(server.base_url + "/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "the first SIGTERM never started a drain"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)

    events = stream_events(server, LONGER, sigterm_twice)
    errors = errors_in(events)
    assert len(errors) == 1 and errors[0]["code"] == 503 and events[-1] == "[DONE]", events[-3:]
    assert wait_exit(server) == 0


def test_restart_engine_serves_again(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(["--restart-engine", "--max-engine-restarts", "1"])
    engine_pid = server.engine_pid()
    events = stream_events(server, LONG, lambda: os.kill(engine_pid, signal.SIGKILL))
    errors = errors_in(events)
    assert errors and errors[0]["code"] == 503, events[-3:]

    # The stream's error came after the death was seen: from then on the server is restarting
    # (503) until the new engine is ready (200); a request in between is refused, never hangs.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        r = httpx.get(server.base_url + "/health", timeout=10)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json() == {"status": "restarting"}
        probe = httpx.post(server.v1 + "/completions", json={**LONG, "max_tokens": 2}, timeout=30)
        assert probe.status_code in (200, 503), probe.text  # 200: the restart finished meanwhile
        if probe.status_code == 503:
            assert "restarting" in probe.json()["error"]["message"]
        time.sleep(0.1)
    wait_healthy(server)
    assert server.proc.poll() is None
    assert server.engine_pid() != engine_pid
    r = httpx.post(server.v1 + "/completions", json={**LONG, "max_tokens": 8}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert "engine restarted" in server.log()
    os.kill(server.engine_pid(), signal.SIGKILL)  # the one restart is spent: now it exits
    assert wait_exit(server) == 1


def test_max_engine_restarts_needs_restart_engine(capsys: pytest.CaptureFixture[str]) -> None:
    from pagedserve.entrypoints.openai.cli_args import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", "m", "--max-engine-restarts", "2"])
    assert exit_info.value.code == 2 and "--restart-engine" in capsys.readouterr().err
    args = parse_args(["--model", "m", "--restart-engine", "--shutdown-timeout", "2.5"])
    assert args.restart_engine and args.max_engine_restarts is None and args.shutdown_timeout == 2.5


def test_killed_server_leaves_no_engine(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory([])
    engine_pid = server.engine_pid()
    events = stream_events(server, {**LONG, "max_tokens": 8}, lambda: None)
    assert events[-1] == "[DONE]"
    # A long request keeps the engine busy (the old orphan check only ran when idle).
    with pytest.raises(httpx.HTTPError):  # the connection drops mid-stream
        stream_events(server, LONG, server.proc.kill)
    server.proc.wait(30)
    deadline = time.monotonic() + 60
    while not process_gone(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_gone(engine_pid)


def test_engine_start_failure_exits_non_zero(tiny_checkpoints: Any, tmp_path: Path) -> None:
    """A KV pool far beyond the host's memory is refused in the engine process: the server must exit
    1 (for its supervisor to see) instead of answering 503 forever. /ping answers like /health."""
    import subprocess
    import sys

    from tests.server.conftest import ENGINE_FLAGS, free_port

    flags = list(ENGINE_FLAGS)
    flags[flags.index("--kv-cache-memory-bytes") + 1] = str(1 << 50)  # 1 PiB
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.entrypoints.openai.api_server", "--model", tiny_checkpoints["llama"],
             "--host", "127.0.0.1", "--port", str(port), *flags],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + EXIT_WAIT_S * 2
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2)
                assert r.status_code == 503  # never healthy, until it exits
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert proc.wait(5) == 1, log.read_text()[-3000:]
        text = log.read_text()
        assert "the engine failed to start" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_ping_is_health(api_server: RunningServer) -> None:
    assert httpx.get(api_server.base_url + "/ping", timeout=10).status_code == 200
    assert httpx.post(api_server.base_url + "/ping", timeout=10).status_code == 200
