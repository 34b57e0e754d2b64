"""Tensor parallelism on GPUs (run on the GPU machine: `pytest -m gpu tests/executor/test_tp_gpu.py`).

- 2 GPUs: a tiny float32 model through the Triton kernels and CUDA graphs gives the same greedy
  tokens at tp=2 (NCCL, one worker process per GPU) as at tp=1 (in-process) and as Hugging Face.
- 1 GPU: the multiproc executor (distributed_executor_backend="mp", one worker process on cuda:0)
  at tp=1 gives HF's tokens, and an NCCL process group of one rank constructs and runs the
  communicator's collectives under torch.distributed.

NVLink multicast stays off in every process (the workers get it from worker_environment; the
one-rank group here sets it itself)."""

from __future__ import annotations

import gc
import os
import tempfile
from typing import Any

import pytest
import torch

from pagedserve.executor.multiproc import MultiprocExecutor
from tests.engine.engine_helpers import greedy, make_engine, run_staggered

pytestmark = pytest.mark.gpu
NEEDS_2 = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
NEEDS_1 = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tokens(finished: dict[str, Any]) -> list[list[int]]:
    return [list(finished[str(i)].outputs[0].token_ids) for i in range(len(finished))]


def _run(path: str, prompts: list[list[int]], **overrides: Any) -> tuple[list[list[int]], int | None]:
    """Greedy tokens of an engine on the GPU, and its worker processes' count (None: in-process)."""
    engine = make_engine(path, device="cuda", kv_cache_memory_bytes=None, gpu_memory_utilization=0.3,
                         **overrides)  # fmt: skip
    try:
        executor = engine.engine_core.executor
        # CUDA graphs captured (in-process runner or every worker): decode steps replay them
        if isinstance(executor, MultiprocExecutor):
            assert executor.cuda_graph_capture_seconds is not None
        else:
            assert engine.engine_core.runner.decode_graphs is not None
        tokens = _tokens(run_staggered(engine, prompts, greedy(), per_step=2))
    finally:
        engine.shutdown()
    workers = executor.world_size if isinstance(executor, MultiprocExecutor) else None
    procs = executor._procs if isinstance(executor, MultiprocExecutor) else []
    del engine, executor  # the in-process runner and its GPU memory go before the next engine starts
    gc.collect()
    torch.cuda.empty_cache()
    if workers is None:
        return tokens, None
    assert all(p.poll() is not None for p in procs)  # the workers have exited
    return tokens, workers


@NEEDS_2
@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: tied embeddings, qk-norm
def test_tp2_cuda_graphs_greedy_equals_tp1_and_hf(arch: str, tiny_checkpoints: Any, greedy_reference: Any) -> None:
    prompts, expected = greedy_reference(arch)
    tp1, _ = _run(tiny_checkpoints[arch], prompts)
    tp2, workers = _run(tiny_checkpoints[arch], prompts, tensor_parallel_size=2)
    assert workers == 2
    assert tp1 == expected
    assert tp2 == expected


@NEEDS_1
def test_mp_executor_tp1_on_one_gpu(tiny_checkpoints: Any, greedy_reference: Any) -> None:
    prompts, expected = greedy_reference("llama")
    tokens, workers = _run(tiny_checkpoints["llama"], prompts, distributed_executor_backend="mp")
    assert workers == 1
    assert tokens == expected


def _one_rank_group(rank: int, store: str, out: str) -> None:
    """In a spawned process: an NCCL group of one rank, the communicator's collectives on cuda:0."""
    import torch.distributed as dist

    from pagedserve.distributed.communicator import TorchDistributedCommunicator

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=1, device_id=device)
    comm = TorchDistributedCommunicator(rank, 1)
    x = torch.arange(4096, dtype=torch.bfloat16, device=device)
    want = x.clone()
    reduced = comm.all_reduce(x)
    gathered = comm.all_gather(want.view(2, -1), dim=-1)
    torch.cuda.synchronize()
    ok = reduced.data_ptr() == x.data_ptr() and torch.equal(reduced, want) and torch.equal(gathered, want.view(2, -1))
    with open(out, "w") as f:
        f.write(f"{dist.get_backend()} {ok}")
    dist.destroy_process_group()


@NEEDS_1
def test_nccl_group_of_one_rank_runs_the_collectives() -> None:
    import torch.multiprocessing as mp

    from benchmarks.nccl_bench import set_no_multicast_env

    set_no_multicast_env()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_one_rank_group, args=(os.path.join(tmp, "store"), out), nprocs=1, join=True)
        with open(out) as f:
            assert f.read() == "nccl True"
