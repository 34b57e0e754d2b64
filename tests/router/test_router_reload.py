"""`pagedserve router` as a process: config reload on file change and on SIGHUP adds and removes
backends under load without a failed request; an invalid file is refused and the old config kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.router.conftest import FAST, region, wait_for
from tests.router.fakes import expected_completion, sse_events
from tests.server.conftest import free_port, stop_process


@pytest.fixture
def router_proc(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: dict[str, Any]) -> tuple[str, Path, subprocess.Popen[bytes]]:
        path, port = tmp_path / "router.yaml", free_port()
        path.write_text(yaml.safe_dump({**FAST, **config}))
        log = (tmp_path / "router.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "pagedserve.entrypoints.cli", "router", "--config", str(path),
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "router.log").read_text()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "router up")
        return url, path, proc

    yield start
    for p in procs:
        stop_process(p)


def _reloads(url: str, result: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'pagedserve_router_config_reloads_total{{result="{result}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_reload_adds_and_removes_backends_under_load(fakes: Any, router_proc: Any) -> None:
    old, new = fakes("old", delay_s=0.01), fakes("new", delay_s=0.01)
    url, path, proc = router_proc({"regions": [region("a", 0, old)]})
    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal done
        with httpx.Client(timeout=60) as client:
            i = 0
            while not stop.is_set():
                i += 1
                prompt, body = f"r{i}", {"prompt": f"r{i}", "max_tokens": 8}
                try:
                    if i % 2:
                        r = client.post(url + "/v1/completions", json=body)
                        text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
                    else:
                        with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                            events = sse_events(r.iter_lines())
                        text = "".join(e["choices"][0]["text"] for e in events[:-1] if e.get("choices"))
                    if text != expected_completion(prompt, 8):
                        failures.append(f"{prompt}: {text!r}")
                except (httpx.HTTPError, KeyError, ValueError) as e:
                    failures.append(f"{prompt}: {e!r}")
                done += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_for(lambda: done >= 4, what="traffic flowing")
        path.write_text(yaml.safe_dump({**FAST, "regions": [region("a", 0, new)]}))  # swap old -> new
        wait_for(lambda: len(new.gen_bodies()) >= 1, what="the added backend gets traffic")
        old_count = len(old.gen_bodies())
        assert _reloads(url, "ok") == 1.0
        # SIGHUP re-reads the (unchanged) file.
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _reloads(url, "ok") == 2.0, what="SIGHUP reload")
        # A broken file is refused; the running config stays.
        path.write_text("regions: [{name: a, backends: []}]\n")
        wait_for(lambda: _reloads(url, "error") == 1.0, what="refused reload")
        seen = done
        wait_for(lambda: done >= seen + 4, what="traffic after the refused reload")
    finally:
        stop.set()
        thread.join(60)
    assert failures == []
    assert len(old.gen_bodies()) == old_count  # the removed backend got nothing new
    assert len(new.gen_bodies()) >= 5
    health = httpx.get(url + "/health").json()
    assert list(health["regions"]["a"]["backends"]) == [new.url]
