"""The engine's KV pools on the CPU: sized from the model when no budget is given, a swap pool only
for swap preemption, explicit budgets winning, and a start-up log line per pool.

The tiny llama's block is 16 KiB (2 layers x 2 (K, V) x 16 tokens x 2 KV heads x 32 dims x 4 bytes).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pagedserve import EngineArgs, LLMEngine, SamplingParams
from pagedserve.config import GiB

BLOCK_BYTES = 16 * 1024


@pytest.fixture(autouse=True)
def _no_env_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGEDSERVE_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)


def _engine(model: str, **kwargs: Any) -> LLMEngine:
    args: dict[str, Any] = dict(model=model, dtype="float32", device="cpu", max_model_len=512)
    args.update(kwargs)
    return LLMEngine.from_engine_args(EngineArgs(**args))


def _generate(engine: LLMEngine, n: int) -> int:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i in range(n):
        engine.add_request(str(i), {"prompt_token_ids": list(range(10, 10 + 20 + i))}, params)
    done = 0
    while engine.has_unfinished_requests():
        done += sum(1 for out in engine.step() if out.finished)
    return done


def test_recompute_has_no_swap_pool(tiny_checkpoints: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    engine = _engine(tiny_checkpoints["llama"], swap_space=4, kv_cache_memory_bytes=1 << 20)
    cache = engine.config.cache_config
    assert cache.swap_space_bytes == 0 and cache.num_cpu_blocks == 0
    assert engine.engine_core.runner.cpu_caches == []
    assert cache.num_gpu_blocks == (1 << 20) // BLOCK_BYTES == 64  # the explicit budget wins
    assert "KV cache: 64 CPU blocks of 16 tokens (1024 tokens), 1.0 MiB of CPU memory" in caplog.text
    assert "swap pool: none (preemption mode recompute" in caplog.text
    assert "GPU" not in caplog.text
    assert _generate(engine, 3) == 3


def test_swap_mode_allocates_the_swap_pool(tiny_checkpoints: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    engine = _engine(tiny_checkpoints["llama"], swap_space=0.01, preemption_mode="swap",
                     kv_cache_memory_bytes=1 << 20)  # fmt: skip
    cache = engine.config.cache_config
    expected = int(0.01 * GiB) // BLOCK_BYTES  # 655 blocks
    assert cache.num_cpu_blocks == expected == 655
    caches = engine.engine_core.runner.cpu_caches
    assert len(caches) == 2 and all(k.shape[0] == v.shape[0] == expected for k, v in caches)
    assert f"swap pool: {expected} CPU blocks (10480 tokens), 10.2 MiB of plain CPU memory" in caplog.text
    assert _generate(engine, 3) == 3


def test_cpu_pool_without_a_budget_is_sized_from_the_model(
    tiny_checkpoints: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # 8 seqs x ceil(512 / 16) = 256 blocks: the smallest bound (model cap: 256 MiB = 16384 blocks)
    engine = _engine(tiny_checkpoints["llama"], max_num_seqs=8)
    assert engine.config.cache_config.kv_cache_memory_bytes is None
    assert engine.config.cache_config.num_gpu_blocks == 256
    assert "256 CPU blocks" in caplog.text and "enough for max_num_seqs full-length sequences" in caplog.text
    assert _generate(engine, 10) == 10  # more requests than max_num_seqs: they queue, all finish


def test_env_budget_is_explicit(tiny_checkpoints: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.001")  # GiB, vLLM's variable
    engine = _engine(tiny_checkpoints["llama"], max_num_seqs=8)
    assert engine.config.cache_config.num_gpu_blocks == int(0.001 * GiB) // BLOCK_BYTES == 65


def test_env_budget_zero_means_automatic(tiny_checkpoints: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CPU_KVCACHE_SPACE", "0")
    config = EngineArgs(model=tiny_checkpoints["llama"], device="cpu").create_engine_config()
    assert config.cache_config.kv_cache_memory_bytes is None
    monkeypatch.setenv("PAGEDSERVE_CPU_KVCACHE_SPACE", "lots")
    with pytest.raises(ValueError, match="PAGEDSERVE_CPU_KVCACHE_SPACE must be a number"):
        EngineArgs(model=tiny_checkpoints["llama"], device="cpu").create_engine_config()


def test_pools_larger_than_the_host_are_refused(tiny_checkpoints: Any) -> None:
    with pytest.raises(ValueError, match="KV cache pools in host memory need"):
        _engine(tiny_checkpoints["llama"], kv_cache_memory_bytes=1 << 50)


def test_cpu_threads_is_carried_and_validated(tiny_checkpoints: Any) -> None:
    assert EngineArgs(model=tiny_checkpoints["llama"], cpu_threads=3).create_engine_config().cpu_threads == 3
    with pytest.raises(ValueError, match="cpu_threads must be >= 1"):
        EngineArgs(model=tiny_checkpoints["llama"], cpu_threads=0).create_engine_config()
