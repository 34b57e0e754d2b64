"""Real servers for the server tests: `python -m pagedserve.entrypoints.openai.api_server` in a
subprocess on a free loopback port, with the tiny llama checkpoint and a small KV cache.

    api_server         plain HTTP, no auth, audit log on (module tests share it, session scope)
    start_server(...)  a context manager for servers with other flags (auth, TLS, kill tests)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

# Small enough for 2 CPU cores; 8 MiB of KV is 512 blocks of 16 tokens for the tiny llama.
MAX_MODEL_LEN = 256
KV_BYTES = 8 << 20
ENGINE_FLAGS = [
    "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(KV_BYTES),
    "--swap-space", "0.01", "--device", "cpu",
]  # fmt: skip
ENGINE_KWARGS: dict[str, Any] = dict(
    dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=KV_BYTES, swap_space=0.01
)
STARTUP_TIMEOUT_S = 180.0


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    base_url: str  # e.g. http://127.0.0.1:12345
    model: str
    log_path: Path
    audit_path: Path | None = None
    verify: Any = True  # httpx `verify` for TLS servers

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def engine_pid(self) -> int:
        """The engine-core child (multiprocessing spawn), not the resource tracker."""
        for child in _children(self.proc.pid):
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                return child
        raise AssertionError(f"no engine process under server pid {self.proc.pid}")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(t) for t in text]
    return out


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (a server drains, then exits), then SIGKILL if it is still there after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(server: RunningServer, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.base_url + "/health", verify=server.verify, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"server not healthy after {timeout_s} s:\n{server.log()[-4000:]}")


@contextlib.contextmanager
def start_server(
    model: str, tmp: Path, extra: list[str] | None = None, tls: tuple[str, str] | None = None,
    audit: bool = False, env: dict[str, str] | None = None,
) -> Iterator[RunningServer]:  # fmt: skip
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    args = [sys.executable, "-m", "pagedserve.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny", *ENGINE_FLAGS,
            *(extra or [])]  # fmt: skip
    audit_path = tmp / f"audit-{port}.jsonl" if audit else None
    if audit_path is not None:
        args += ["--audit-log", str(audit_path)]
    if tls is not None:
        args += ["--ssl-keyfile", tls[0], "--ssl-certfile", tls[1]]
    full_env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "PAGEDSERVE_API_KEYS")}
    full_env.update(env or {})
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    scheme = "https" if tls else "http"
    verify: Any = ssl.create_default_context(cafile=tls[1]) if tls else True
    server = RunningServer(proc, f"{scheme}://127.0.0.1:{port}", "tiny", log_path, audit_path, verify)
    try:
        wait_healthy(server)
        yield server
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def api_server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("api_server")
    with start_server(tiny_checkpoints["llama"], tmp, audit=True) as server:
        yield server


@pytest.fixture(scope="session")
def offline_llm(tiny_checkpoints: Any) -> Any:
    """The same model through the offline `LLM` class: the reference for server outputs."""
    from pagedserve import LLM

    return LLM(model=tiny_checkpoints["llama"], **ENGINE_KWARGS)
