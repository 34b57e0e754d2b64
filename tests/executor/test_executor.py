"""The executor machinery with one rank in a worker process (distributed_executor_backend "mp"):
the same tokens as the in-process runner, a dead worker fails the engine (never hangs it), and
shutdown leaves no process behind. Tensor-parallel runs (several ranks) are in test_tensor_parallel.py."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from pagedserve import EngineArgs, LLMEngine, SamplingParams
from pagedserve.executor import WorkerDiedError
from pagedserve.executor.multiproc import MultiprocExecutor
from pagedserve.sampling_params import StructuredOutputsParams
from tests.engine.engine_helpers import greedy, make_prompts, run_staggered

CHOICE = StructuredOutputsParams(choice=["river", "mountain", "city garden"])
KWARGS: dict[str, Any] = dict(dtype="float32", max_model_len=256, kv_cache_memory_bytes=8 << 20, swap_space=0.01)


def _engine(model: str, **overrides: Any) -> LLMEngine:
    return LLMEngine.from_engine_args(EngineArgs(model=model, **{**KWARGS, **overrides}))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_dead(executor: MultiprocExecutor) -> str:
    """check_health until it reports the death (the kernel reaps a killed child asynchronously)."""
    for _ in range(200):
        try:
            executor.check_health()
        except WorkerDiedError as e:
            return str(e)
        time.sleep(0.05)
    raise AssertionError("the dead worker was never noticed")


@pytest.fixture(scope="module")
def prompts(tiny_checkpoints: Any) -> list[list[int]]:
    return make_prompts(512, seed=3, lengths=(1, 17, 40, 100))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_worker_process_gives_the_in_process_tokens(tiny_checkpoints, prompts, async_scheduling) -> None:
    model = tiny_checkpoints["llama"]
    reference = run_staggered(_engine(model), prompts, greedy(), per_step=2)
    engine = _engine(model, distributed_executor_backend="mp", async_scheduling=async_scheduling)
    executor = engine.engine_core.executor
    assert isinstance(executor, MultiprocExecutor) and executor.world_size == 1
    try:
        got = run_staggered(engine, prompts, greedy(), per_step=2)
        seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
        sampled = run_staggered(engine, prompts[:2], seeded)
        structured = SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=CHOICE)
        chosen = run_staggered(engine, prompts[:2], structured)  # the plan carries the bitmasks
        engine.engine_core.check_health()  # alive: no error
        if async_scheduling:  # killed mid-generation: the step in flight fails, never hangs
            _kill_mid_generation(engine, executor, prompts)
        else:  # an idle engine notices a dead worker too (no step needed)
            os.kill(executor.pids[0], signal.SIGKILL)
            assert "exited with code -9" in _wait_dead(executor)
    finally:
        engine.shutdown()
    for key, out in reference.items():
        assert got[key].outputs[0].token_ids == out.outputs[0].token_ids, key
    in_process = _engine(model)
    want = run_staggered(in_process, prompts[:2], seeded)
    assert [sampled[k].outputs[0].token_ids for k in "01"] == [want[k].outputs[0].token_ids for k in "01"]
    want = run_staggered(in_process, prompts[:2], structured)
    assert [chosen[k].outputs[0].text for k in "01"] == [want[k].outputs[0].text for k in "01"]
    assert all(chosen[k].outputs[0].text in CHOICE.choice for k in "01")  # type: ignore[operator]
    assert all(_gone(pid) for pid in executor.pids)
    with pytest.raises(AttributeError, match="worker processes"):
        _ = engine.engine_core.runner


def _kill_mid_generation(engine: LLMEngine, executor: MultiprocExecutor, prompts: list[list[int]]) -> None:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"long-{i}", {"prompt_token_ids": prompt}, greedy(max_tokens=50))
    engine.step()
    os.kill(executor.pids[0], signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match=r"rank 0 \(pid \d+\) exited with code -9"):
        while engine.has_unfinished_requests():
            engine.step()
    with pytest.raises(WorkerDiedError):  # stays failed: no step waits on a dead group
        engine.step()


@pytest.mark.parametrize(("tp", "message"), [
    (3, "4 attention heads must be divisible by tensor_parallel_size"),
    (8, "4 attention heads must be divisible by tensor_parallel_size"),
])
def test_heads_must_divide_over_the_ranks(tiny_checkpoints, tp, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineArgs(model=tiny_checkpoints["llama"], tensor_parallel_size=tp, **KWARGS).create_engine_config()


def test_kv_heads_split_or_replicate(tiny_checkpoints) -> None:
    from pagedserve.config import ParallelConfig

    spec = EngineArgs(model=tiny_checkpoints["llama"], **KWARGS).create_engine_config().model_config.model_spec
    assert (spec.num_heads, spec.num_kv_heads) == (4, 2)
    for tp in (1, 2, 4):  # 2 KV heads: split over 2 ranks, replicated on 4
        ParallelConfig(tp).verify(spec, "cpu")
    spec6 = type(spec)(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__},
                          "num_heads": 12, "num_kv_heads": 6})  # fmt: skip
    with pytest.raises(ValueError, match="must divide one another"):
        ParallelConfig(4).verify(spec6, "cpu")  # 6 KV heads over 4 ranks: neither splits nor replicates
    with pytest.raises(ValueError, match="'uni' runs one rank"):
        ParallelConfig(2, "uni").verify(spec, "cpu")
