"""Load shedding (429 past --max-waiting-requests) and engine death (503, in-flight requests fail).

The server here is the test's own: the last test kills its engine process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import RunningServer, start_server


@pytest.fixture(scope="module")
def small_server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("small_server")
    extra = ["--max-num-seqs", "2", "--max-waiting-requests", "2"]
    with start_server(tiny_checkpoints["llama"], tmp, extra=extra) as server:
        yield server


def test_load_shedding_429(small_server: RunningServer) -> None:
    body = {
        "model": "tiny",
        "prompt": "the model runs",
        "max_tokens": 60,
        "ignore_eos": True,
        "temperature": 0,
    }

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small_server.v1, timeout=120) as http:
            return await asyncio.gather(*[http.post("/completions", json=body) for _ in range(12)])

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 4, codes
    shed = next(r for r in responses if r.status_code == 429)
    assert shed.json()["error"]["code"] == 429 and "retry" in shed.json()["error"]["message"].lower()
    texts = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # every admitted request ran to the same greedy completion


def test_engine_death_fails_inflight_requests_and_exits_nonzero(small_server: RunningServer) -> None:
    """A dead engine is no zombie front: in-flight requests get their errors, then the server exits
    with status 1 so that its supervisor restarts it (--restart-engine: tests/server/test_lifecycle.py)."""
    engine_pid = small_server.engine_pid()
    body = {"model": "tiny", "prompt": "the model", "max_tokens": 240, "ignore_eos": True, "stream": True}

    async def run() -> tuple[list[str], httpx.Response]:
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=60) as http:
            events: list[str] = []
            waiting = asyncio.create_task(http.post("/v1/completions", json={**body, "stream": False}))
            async with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    events.append(line)
                    if len(events) == 1:  # mid-stream: kill the engine
                        os.kill(engine_pid, signal.SIGKILL)
            return events, await waiting

    events, other = asyncio.run(asyncio.wait_for(run(), timeout=120))
    errors = [json.loads(e[6:]) for e in events if e.startswith("data: {") and '"error"' in e]
    assert errors and errors[0]["error"]["code"] == 503, events[-3:]
    assert events[-1] == "data: [DONE]"
    assert other.status_code == 503 and other.json()["error"]["type"] == "service_unavailable_error"
    assert small_server.proc.wait(90) == 1
    assert "the engine died; the server exits" in small_server.log()
