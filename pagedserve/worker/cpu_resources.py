"""Host resources of the engine: how much memory its CPU-side pools may take, how many threads it runs.

KV cache on the CPU (no explicit budget given). The pool is allocated with torch.zeros, so every
page is touched at start-up: what the start-up log reports is what the process holds, and a pool
that does not fit fails at start, not hours later when the prefix cache has cycled through every
block (freed blocks go to the tail of the free queue, so all of them get used eventually). The
pool takes the smallest of three bounds, in blocks:

    needed     = max_num_seqs * ceil(max_model_len / block_size)   never more than can be used
    model cap  = max(KV_WEIGHT_RATIO * weight bytes, MIN_MODEL_CAP_BYTES) / bytes_per_block,
                 and at least one full-length sequence
    memory cap = AVAILABLE_FRACTION * available host memory / bytes_per_block

Why a model cap: a CPU decode step streams the weights (W bytes) and the live KV (K bytes) from
memory, so with B sequences throughput ~ B / (W + K) saturates as K grows; at K = 4 W it is 80 % of
the limit, and a larger pool only makes every step slower. The floor keeps tiny models (whose steps
are overhead-bound, not bandwidth-bound) from a uselessly small pool.

Threads: torch's default intra-op count is every core, in each process. The engine process and the
HTTP front process then fight over the same cores and OpenMP spin-waits make it far worse (1000
streaming clients on 2 busy cores: 16 s per step). The engine takes the usable cores but one, the
front process takes one torch thread, as vLLM's CPU backend binds its OpenMP threads.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MiB = 1 << 20
KV_WEIGHT_RATIO = 4
MIN_MODEL_CAP_BYTES = 256 * MiB
AVAILABLE_FRACTION = 0.5

# ---------------------------------------------------------------------------- memory


@dataclass(slots=True, frozen=True)
class CpuKVSizing:
    num_blocks: int
    limit: str  # the bound that decided: "needed", "model" or "memory"
    weight_bytes: int
    available_bytes: int | None

    def describe(self) -> str:
        if self.limit == "needed":
            return "enough for max_num_seqs full-length sequences"
        if self.limit == "model":
            return (f"model cap: max({KV_WEIGHT_RATIO} x {self.weight_bytes / MiB:.1f} MiB of weights, "
                    f"{MIN_MODEL_CAP_BYTES // MiB} MiB); --kv-cache-memory-bytes sets it")
        available = (self.available_bytes or 0) / MiB
        return (f"memory cap: {AVAILABLE_FRACTION:.0%} of {available:.0f} MiB available; "
                "--kv-cache-memory-bytes sets it")


def cpu_kv_cache_blocks(
    bytes_per_block: int, block_size: int, max_num_seqs: int, max_model_len: int,
    available_bytes: int | None, weight_bytes: int,
) -> CpuKVSizing:  # fmt: skip
    """Blocks of the CPU KV cache when no budget is given (see the module docstring).

    available_bytes None (unknown host) leaves the memory cap out. The result may hold fewer than
    max_model_len tokens when memory is short: EngineCore then refuses to start, with the reason.
    """
    per_seq = -(-max_model_len // block_size)
    needed = max_num_seqs * per_seq
    model_bytes = max(KV_WEIGHT_RATIO * weight_bytes, MIN_MODEL_CAP_BYTES)
    bounds = [("needed", needed), ("model", max(model_bytes // bytes_per_block, per_seq))]
    if available_bytes is not None:
        bounds.append(("memory", int(AVAILABLE_FRACTION * max(available_bytes, 0)) // bytes_per_block))
    limit, blocks = min(bounds, key=lambda b: b[1])  # first of equals: "needed" before the caps
    return CpuKVSizing(blocks, limit, weight_bytes, available_bytes)


def module_bytes(module: Any) -> int:
    """Bytes of a torch module's parameters and buffers (tied weights counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def mem_available_bytes(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory that can be allocated without swapping: MemAvailable of /proc/meminfo, lowered to the
    room left under a cgroup v2 limit (containers: the OOM killer acts on the cgroup). None when
    neither is readable (not Linux)."""
    candidates: list[int] = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)  # the file says kB, meaning KiB
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit_text = (cgroup / "memory.max").read_text().strip()
        if limit_text != "max":
            current = int((cgroup / "memory.current").read_text())
            # page cache the kernel can drop counts as room (as MemAvailable counts it)
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            reclaimable = int(stat.get("inactive_file", 0))
            candidates.append(max(int(limit_text) - current + reclaimable, 0))
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def check_host_pools_fit(host_pool_bytes: int, available_bytes: int | None) -> None:
    """Pools in host memory are touched at allocation (zeros; pinned memory cannot be paged out):
    more than the available memory would be an OOM kill mid-start, so refuse with the reason."""
    if available_bytes is not None and host_pool_bytes > available_bytes:
        raise ValueError(
            f"the KV cache pools in host memory need {host_pool_bytes / MiB:.0f} MiB but only "
            f"{available_bytes / MiB:.0f} MiB are available: lower --kv-cache-memory-bytes or "
            "--swap-space (the swap pool is only allocated with --preemption-mode swap)"
        )


# ---------------------------------------------------------------------------- threads


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, lowered to a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(cores, 1)


def choose_cpu_threads(explicit: int | None, env: Mapping[str, str], cores: int) -> tuple[int, str]:
    """(intra-op threads of the engine process, why). The flag wins, then OMP_NUM_THREADS, then
    the usable cores less the one left to the front process."""
    if explicit is not None:
        return explicit, "--cpu-threads"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), "OMP_NUM_THREADS"
    return max(1, cores - 1), f"{cores} usable cores, one left to the front process"


def configure_engine_threads(device: str, explicit: int | None) -> int | None:
    """Called once at engine-process start. On the CPU the count is chosen (choose_cpu_threads); on
    a GPU torch's default stays unless the flag is given. Returns the count set, or None."""
    if device != "cpu" and explicit is None:
        return None
    import torch

    threads, reason = choose_cpu_threads(explicit, os.environ, usable_cores())
    torch.set_num_threads(threads)
    logger.info("engine uses %d torch intra-op thread(s) (%s)", threads, reason)
    return threads


def configure_front_threads() -> None:
    """The HTTP front process tokenizes and serves JSON; one torch thread leaves the cores to the
    engine process (torch is imported there anyway, by the tokenizer and config loading)."""
    import torch

    torch.set_num_threads(1)
