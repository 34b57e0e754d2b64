"""The README's demo (`pagedserve serve`, no model, no KV flags) runs in under 2 GiB resident.

Resident memory is VmRSS of /proc/PID/status, front process plus engine process, after requests.
The KV pool is allocated with torch.zeros, so its pages are resident from start-up: the test checks
that the engine's VmRSS covers the pool the log reports, so a lazily-mapped pool (which would grow
later, as the prefix cache cycles through every block) cannot pass for a small one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pagedserve.worker.cpu_resources import usable_cores
from tests.server.conftest import RunningServer, free_port, stop_process, wait_healthy

LIMIT_BYTES = 2 << 30
ENV_OVERRIDES = ("VLLM_CPU_KVCACHE_SPACE", "PAGEDSERVE_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS",
                 "VLLM_API_KEY", "PAGEDSERVE_API_KEYS")  # fmt: skip


def vm_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # kB (KiB)
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("demo")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ENV_OVERRIDES}
    env["PAGEDSERVE_CACHE"] = str(tmp / "cache")  # the demo model is built there
    env["PAGEDSERVE_BUILTIN_MODEL"] = "demo"  # the random demo model, even where SmolLM2 is installed
    # `pagedserve serve` as the README runs it; --device cpu only pins what a CPU-only host picks
    args = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--log-format", "text"]  # fmt: skip
    log_path = tmp / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(proc, f"http://127.0.0.1:{port}", "pagedserve-demo", log_path)
    try:
        wait_healthy(server)
        yield server
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_demo_server_stays_under_2_gib(demo_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=demo_server.v1, api_key="unused", http_client=httpx.Client(timeout=120))
    for i in range(3):
        out = client.completions.create(model=demo_server.model, prompt=f"The cat {i} runs", max_tokens=16)
        assert out.usage is not None and out.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model=demo_server.model, messages=[{"role": "user", "content": "hello"}], max_tokens=16, stream=True
    )
    assert sum(1 for _ in stream) >= 1

    engine_pid = demo_server.engine_pid()
    front, engine = vm_rss_bytes(demo_server.proc.pid), vm_rss_bytes(engine_pid)
    log = demo_server.log()
    assert front + engine < LIMIT_BYTES, f"front {front >> 20} MiB + engine {engine >> 20} MiB:\n{log[-3000:]}"

    pool = re.search(r"KV cache: (\d+) CPU blocks of 16 tokens \(\d+ tokens\), ([\d.]+) MiB of CPU memory", log)
    assert pool is not None, log[-3000:]
    pool_bytes = float(pool.group(2)) * (1 << 20)
    assert pool_bytes >= 64 << 20  # a real pool, not a token one
    assert engine > pool_bytes  # the pool's pages are resident (zeros), so this RSS is honest
    assert "swap pool: none (preemption mode recompute" in log
    assert "GPU blocks" not in log
    expected_threads = max(1, usable_cores() - 1)
    assert f"engine uses {expected_threads} torch intra-op thread(s)" in log
