"""The engine's tensor-parallel workers run with NVLink multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1) even when the engine process does
not set them, and with the rest of the engine's environment passed through (read from the live
worker's /proc/PID/environ)."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.engine.engine_helpers import make_engine

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_get_multicast_off_and_the_engine_environment(tiny_checkpoints: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for key in MULTICAST_OFF:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PAGEDSERVE_TEST_PASSED_THROUGH", "yes")
    engine = make_engine(tiny_checkpoints["llama"], distributed_executor_backend="mp", max_model_len=128)
    try:
        pids = engine.engine_core.executor.pids
        assert len(pids) == 1
        with open(f"/proc/{pids[0]}/environ", "rb") as f:
            env = dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)
    finally:
        engine.shutdown()
    assert {k: env.get(k) for k in MULTICAST_OFF} == MULTICAST_OFF
    assert env.get("PAGEDSERVE_TEST_PASSED_THROUGH") == "yes"
