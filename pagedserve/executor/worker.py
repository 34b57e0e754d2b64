"""One tensor-parallel rank in its own process: `python -m pagedserve.executor.worker FILE RANK`.

    start   guard the parent (exit when the engine process is gone), join the process group,
            build the ModelRunner on this rank's device with this rank's shard, send Ready
    loop    Call -> Reply (KV sizing, KV allocation + CUDA graph capture)
            Step -> runner.execute_model(plan); rank 0 sends StepOutput, the others nothing
            Shutdown -> leave the group, exit 0
    error   send Failure (with the traceback) and exit 1 at once: a peer stuck in a collective
            is the driver's to stop, never this process's to wait for

Workers are started with subprocess (not multiprocessing): the engine process may itself be a
daemonic multiprocessing child (the server's engine core), which multiprocessing forbids to
have children.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import traceback
from typing import Any

import zmq

from pagedserve.executor.messages import (
    Call,
    Failure,
    Ready,
    Reply,
    Shutdown,
    Step,
    StepOutput,
    WorkerLaunch,
    decode,
    encode,
)

logger = logging.getLogger("pagedserve.executor.worker")


def _configure(launch: WorkerLaunch, rank: int) -> Any:
    """Logging and threads of this rank; returns its torch device."""
    import torch

    from pagedserve.engine.engine_core_proc import ENV_LOG_JSON, ENV_LOG_LEVEL
    from pagedserve.worker.cpu_resources import choose_cpu_threads, usable_cores

    if os.environ.get(ENV_LOG_LEVEL):
        from pagedserve.ops.logging import configure_logging

        configure_logging(os.environ[ENV_LOG_LEVEL], json=os.environ.get(ENV_LOG_JSON, "1") == "1")
    config = launch.config
    if config.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        return device
    # the ranks share the host's cores (the engine process only waits while they compute)
    threads, reason = choose_cpu_threads(config.cpu_threads, os.environ, usable_cores())
    if reason not in ("--cpu-threads", "OMP_NUM_THREADS"):  # chosen: split among the ranks
        threads = max(1, threads // launch.world_size)
    torch.set_num_threads(threads)
    return torch.device("cpu")


def serve(launch: WorkerLaunch, rank: int) -> int:
    from pagedserve.distributed.communicator import init_tensor_parallel, shutdown_tensor_parallel
    from pagedserve.worker.model_runner import ModelRunner

    ctx = zmq.Context()
    results = ctx.socket(zmq.PUSH)
    results.connect(launch.result_addr)
    plans = ctx.socket(zmq.PULL)
    plans.connect(launch.plan_addrs[rank])
    try:
        device = _configure(launch, rank)
        parallel = init_tensor_parallel(rank, launch.world_size, launch.store_path, device)
        runner = ModelRunner(launch.config, parallel=parallel, device=device)
        results.send(encode(Ready(rank, os.getpid(), runner.vocab_size, runner.load_seconds)))
        while True:
            msg = decode(plans.recv())
            if isinstance(msg, Step):
                output = runner.execute_model(msg.plan)
                if rank == 0 and not msg.plan.is_empty:  # an empty plan's output is known
                    results.send(encode(StepOutput(msg.plan.step_id, output)))
            elif isinstance(msg, Call):
                if msg.method == "determine_num_blocks":
                    value: Any = runner.determine_num_blocks()
                elif msg.method == "initialize_kv_cache":
                    runner.initialize_kv_cache(*msg.args)
                    value = runner.cuda_graph_capture_seconds
                else:
                    raise ValueError(f"unknown worker call {msg.method!r}")
                results.send(encode(Reply(rank, value)))
            elif isinstance(msg, Shutdown):
                shutdown_tensor_parallel()
                return 0
    except Exception as e:  # noqa: BLE001 - reported to the driver, which fails the engine
        logger.exception("tensor-parallel rank %d failed", rank)
        results.send(encode(Failure(rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
        results.close(linger=2000)
        return 1
    finally:
        plans.close(linger=0)
        results.close(linger=1000)
        ctx.term()


def main(argv: list[str]) -> None:
    path, rank_text = argv
    with open(path, "rb") as f:
        launch: WorkerLaunch = pickle.load(f)  # noqa: S301 - written by this worker's engine
    from pagedserve.engine.parent_watch import guard_parent

    guard_parent(launch.parent_pid)  # never outlive the engine (death signal + watchdog)
    code = serve(launch, int(rank_text))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: a failed group's destructors could block


if __name__ == "__main__":
    main(sys.argv[1:])
