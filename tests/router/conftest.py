"""Router test fixtures: fake backends (fakes.py) and an in-process router on loopback."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pagedserve.router.app import Router, build_app
from pagedserve.router.config import parse_config
from tests.router.fakes import Behaviour, FakeBackend, serve_in_thread, stop_thread_server
from tests.server.conftest import free_port

FAST = {"probe_interval_s": 0.2, "probe_timeout_s": 1.0, "retry_deadline_s": 10.0,
        "breaker": {"failure_threshold": 2, "open_s": 0.5}}  # fmt: skip


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeBackend]]:
    started: list[FakeBackend] = []

    def make(name: str, **behaviour: Any) -> FakeBackend:
        b = FakeBackend(name, Behaviour(**behaviour)).start()
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@contextlib.contextmanager
def running_router(config: dict[str, Any], tmp: Path) -> Iterator[tuple[Router, str]]:
    """The router app in a uvicorn thread; config written to tmp/router.yaml (for reloads)."""
    path = tmp / "router.yaml"
    path.write_text(yaml.safe_dump({**FAST, **config}))
    router = Router(parse_config(yaml.safe_load(path.read_text())), path)
    port = free_port()
    server, thread = serve_in_thread(build_app(router), port)
    try:
        yield router, f"http://127.0.0.1:{port}"
    finally:
        stop_thread_server(server, thread)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def region(name: str, priority: int, *backends: FakeBackend | str, **extra: Any) -> dict[str, Any]:
    urls = [b.url if isinstance(b, FakeBackend) else b for b in backends]
    return {"name": name, "priority": priority, "backends": [{"url": u, **extra} for u in urls]}
