"""All-reduce latency and bandwidth as the tensor-parallel layers issue them: one process per GPU
(NCCL, cuda:rank) or per CPU rank (gloo, --cpu), a bf16 (GPU) / float32 (CPU) tensor of
tokens x hidden summed in place, warm-up first, then the median of timed repeats (CUDA events on
the GPU, perf_counter on the CPU; every rank times, the slowest rank's median is reported: a
collective ends when its last rank does).

    python -m benchmarks.nccl_bench --world-size 2 --hidden 4096 --tokens 1 16384 [--json OUT.json]

tokens 1 is a batch-1 decode step's message (one hidden vector, 8 KiB at hidden 4096 in bf16);
the engine's token budget (16384 offline on an H200) is a full mixed step's. Bus bandwidth is
nccl-tests' measure for all-reduce: bytes x 2 (n - 1) / n / time.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1, the settings the engine's workers get): set here before any process
starts, so every rank inherits them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

from pagedserve.distributed.communicator import worker_environment

NO_MULTICAST = {k: v for k, v in worker_environment({}, "cuda").items()}


def set_no_multicast_env() -> None:
    """The three multicast switches, in this process's environment (children inherit them)."""
    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)


def _rank_main(rank: int, world_size: int, store: str, out_dir: str, hidden: int, tokens: list[int],
               repeats: int, warmup: int, cpu: bool) -> None:
    import torch
    import torch.distributed as dist

    if cpu:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if cpu else "nccl", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, device_id=None if cpu else device)
    dtype = torch.float32 if cpu else torch.bfloat16
    rows: list[dict[str, Any]] = []
    for n in tokens:
        x = torch.randn(n, hidden, dtype=dtype, device=device)
        for _ in range(warmup):
            dist.all_reduce(x)
        times_ms = []
        for _ in range(repeats):
            if cpu:
                started = time.perf_counter()
                dist.all_reduce(x)
                times_ms.append((time.perf_counter() - started) * 1e3)
            else:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dist.all_reduce(x)
                end.record()
                end.synchronize()
                times_ms.append(start.elapsed_time(end))
        times_ms.sort()
        rows.append({"tokens": n, "bytes": x.numel() * x.element_size(), "median_ms": times_ms[len(times_ms) // 2]})
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def measure_all_reduce(world_size: int, hidden: int, tokens: list[int], repeats: int = 100, warmup: int = 20,
                       cpu: bool = False) -> list[dict[str, Any]]:
    """One row per message size: tokens, bytes, latency_us (slowest rank's median), bus_gb_per_s."""
    import torch.multiprocessing as mp

    set_no_multicast_env()
    with tempfile.TemporaryDirectory(prefix="nccl-bench-") as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_rank_main, args=(world_size, store, tmp, hidden, tokens, repeats, warmup, cpu),
                 nprocs=world_size, join=True)  # raises if a rank failed; every rank has exited here
        per_rank = []
        for r in range(world_size):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    rows = []
    for i, n in enumerate(tokens):
        ms = max(ranks[i]["median_ms"] for ranks in per_rank)
        size = per_rank[0][i]["bytes"]
        rows.append({"world_size": world_size, "hidden": hidden, "tokens": n, "bytes": size,
                     "latency_us": ms * 1e3,
                     "bus_gb_per_s": size * 2 * (world_size - 1) / world_size / (ms / 1e3) / 1e9})
    return rows


def main() -> None:
    from benchmarks.common import print_table, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 2048, 16384])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--cpu", action="store_true", help="gloo over CPU processes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = measure_all_reduce(args.world_size, args.hidden, args.tokens, args.repeats, cpu=args.cpu)
    print_table(f"all-reduce, {args.world_size} ranks ({'gloo' if args.cpu else 'NCCL'})", rows)
    write_json(args.json, {"all_reduce": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
