"""Shared helpers of the benchmark scripts: environment facts, table printing, JSON results."""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it: the serving client's processes import this
# module, and four of them importing torch at once took ~14 s on the H200 host (2026-12-02).


def environment() -> dict[str, Any]:
    import torch

    # PAGEDSERVE_COMMIT first: the device machine's copy of the tree may carry a stale .git
    commit = os.environ.get("PAGEDSERVE_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["device"] = "cpu"
    try:
        import transformers
        import triton

        info["transformers"] = transformers.__version__
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def measure_copy_bandwidth(num_bytes: int = 2 << 30, repeats: int = 20, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    import torch

    src = torch.randn(num_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(functools.partial(dst.copy_, src), repeats, device)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * num_bytes / seconds


def measure_matmul_rate(n: int = 8192, repeats: int = 20, device: str = "cuda",
                        dtype: torch.dtype | None = None) -> float:
    """Dense matmul rate in FLOP/s (2 n^3 per product, median) on random normal (non-zero) data:
    zeros would flatter the rate (less switching power, so higher clocks). dtype: bfloat16 unless
    given."""
    import torch

    dtype = dtype or torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
    out = torch.empty(n, n, dtype=dtype, device=device)
    seconds = _median_seconds(functools.partial(torch.matmul, a, b, out=out), repeats, device)
    del a, b, out
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2.0 * n**3 / seconds


def _median_seconds(fn: Any, repeats: int, device: str) -> float:
    """Median time of fn() after 3 warm-up calls: CUDA events on the GPU, perf_counter on the CPU."""
    if device == "cuda":
        return time_cuda_ms(fn, repeats, warmup=3) / 1e3
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]


def time_cuda_ms(fn: Any, repeats: int = 50, warmup: int = 5) -> float:
    """Median device time of fn() in ms (CUDA events), after `warmup` warm-up calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def top1_lowest_id(entry: dict[int, Any]) -> int:
    """The top-1 token of one position's logprobs {token: Logprob} by argmax's rule: the lowest
    id among the tokens of the largest logprob (bf16 logits tie at the top at ~5% of positions)."""
    best = max(lp.logprob for lp in entry.values())
    return min(token for token, lp in entry.items() if lp.logprob == best)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n## {title}")
    print(" | ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("-|-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), **payload}, f, indent=2)
