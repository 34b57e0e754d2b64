"""The OpenAI server with --tensor-parallel-size 2 on the CPU (engine process + two gloo worker
processes): the openai SDK gets tp=1's greedy completions; SIGKILL of one rank ends the in-flight
stream with an error and turns /health 503; no worker process outlives its engine, killed or not
(graceful shutdown: tests/executor/test_executor.py)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pagedserve import SamplingParams
from tests.server.conftest import RunningServer, start_server, wait_healthy
from tests.server.test_lifecycle import LONG, errors_in, stream_events

PROMPTS = ["the model runs", "a cat sees the river", "every request finds a block"]
MAX_TOKENS = 8


def _worker_pids(engine_pid: int) -> list[int]:
    """The engine's tensor-parallel worker processes (python -m pagedserve.executor.worker)."""
    pids = []
    for task in Path(f"/proc/{engine_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"pagedserve.executor.worker" in cmd:
                pids.append(int(child))
    return sorted(pids)


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by its new parent counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_gone(pids: list[int]) -> bool:
    """Whether every pid exits within a generous bound (a watched orphan exits in about 0.5 s)."""
    for _ in range(600):
        if all(_gone(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def tp_server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("tp_server")
    extra = ["--tensor-parallel-size", "2", "--restart-engine", "--max-engine-restarts", "1"]
    with start_server(tiny_checkpoints["llama"], tmp, extra=extra) as server:
        yield server


def test_openai_sdk_against_tp2(tp_server: RunningServer, offline_llm: Any) -> None:
    assert len(_worker_pids(tp_server.engine_pid())) == 2
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    expected = [o.outputs[0].text for o in offline_llm.generate(PROMPTS, params, use_tqdm=False)]
    c = openai.OpenAI(base_url=tp_server.v1, api_key="unused", max_retries=0, timeout=60)
    batch = c.completions.create(model="tiny", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert [ch.text for ch in sorted(batch.choices, key=lambda ch: ch.index)] == expected
    messages = [{"role": "user", "content": "the cat runs"}]
    want = offline_llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                       temperature=0, stream=True)  # fmt: skip
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want
    # structured outputs: the engine core's bitmask travels with the plan to the ranks
    choices = ["river", "mountain", "city garden"]
    r = c.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0,
                             extra_body={"guided_choice": choices})  # fmt: skip
    assert r.choices[0].text in choices


def test_killed_rank_fails_inflight_and_health_503(tp_server: RunningServer) -> None:
    engine_pid = tp_server.engine_pid()
    workers = _worker_pids(engine_pid)
    events = stream_events(tp_server, LONG, lambda: os.kill(workers[1], signal.SIGKILL))
    errors = errors_in(events)
    assert errors and errors[0]["code"] == 503, events[-3:]
    assert events[-1] == "[DONE]"
    # the death failed the engine: restarting (a fresh engine and ranks take seconds to start)
    r = httpx.get(tp_server.base_url + "/health", timeout=10)
    assert r.status_code == 503 and r.json() == {"status": "restarting"}
    wait_healthy(tp_server)
    assert all(_gone(pid) for pid in [engine_pid, *workers])  # the old engine and both its ranks
    assert "tensor-parallel rank 1" in tp_server.log()
    new_workers = _worker_pids(tp_server.engine_pid())
    assert len(new_workers) == 2 and not set(new_workers) & set(workers)
    r = httpx.post(tp_server.v1 + "/completions", json={**LONG, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    # the engine process itself killed (the one restart is spent: the server exits 1): its ranks
    # see their parent gone (engine/parent_watch.py) and exit, no orphan left computing
    os.kill(tp_server.engine_pid(), signal.SIGKILL)
    assert tp_server.proc.wait(90) == 1
    assert _wait_gone(new_workers)
