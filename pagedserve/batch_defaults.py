"""Batch limits that fit the hardware: max_num_seqs / max_num_batched_tokens when the user leaves
them unset, chosen from the device and the usage context, as vLLM V1 chooses them.

    device class                          offline LLM ("llm")     server ("server")
                                          seqs     tokens         seqs     tokens
    large GPU: >= 70 GiB, not an A100     1024     16384          1024     8192
    any other GPU (A100, L4, 24 GiB ...)  256      8192           256      2048
    CPU (pagedserve's own, unchanged)     256      2048           256      2048

The large-GPU row is where vLLM puts H100 / H200 / MI300x; A100-80GB is kept out of it because a
large token budget measured slower there (vLLM PR 17885). The server gets the smaller token budget
because the budget bounds one step's compute, hence every running request's inter-token latency;
offline nobody waits on a single token. On the CPU pagedserve keeps its earlier 256 / 2048 in both
contexts (vLLM's CPU table differs), so CPU behaviour does not depend on this module.

Then, as vLLM does: without chunked prefill the token budget is at least max_model_len (a prompt
is never split), and on a GPU a defaulted max_num_seqs is at most the token budget (each running
sequence needs one token of it per step).

Torch-free at import time (config.py is); probe_device() imports torch lazily.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

GiB = 1 << 30
USAGE_CONTEXTS = ("llm", "server")  # vLLM's UsageContext.LLM_CLASS / OPENAI_API_SERVER
LARGE_GPU_MIN_BYTES = 70 * GiB

# device class -> usage context -> (max_num_seqs, max_num_batched_tokens)
_TABLE: dict[str, dict[str, tuple[int, int]]] = {
    "large-gpu": {"llm": (1024, 16384), "server": (1024, 8192)},
    "gpu": {"llm": (256, 8192), "server": (256, 2048)},
    "cpu": {"llm": (256, 2048), "server": (256, 2048)},
}


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What the defaults depend on. total_memory_bytes 0: unknown (a GPU then gets the small row)."""

    kind: str  # "cpu" | "cuda"
    name: str = ""
    total_memory_bytes: int = 0

    def describe(self) -> str:
        if self.kind == "cpu":
            return "cpu"
        mem = f"{self.total_memory_bytes / GiB:.0f} GiB" if self.total_memory_bytes else "memory unknown"
        return f"{self.name or 'unknown GPU'} ({mem})"


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    source: str  # how they were chosen, for the log and EngineConfig, e.g. "default for ... (llm)"


def device_class(device: DeviceInfo) -> str:
    """"large-gpu" | "gpu" | "cpu" (the rows of the table above)."""
    if device.kind != "cuda":
        return "cpu"
    if device.total_memory_bytes >= LARGE_GPU_MIN_BYTES and "a100" not in device.name.lower():
        return "large-gpu"
    return "gpu"


def default_batch_limits(device: DeviceInfo, usage_context: str) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) from the table, before the clamps."""
    if usage_context not in USAGE_CONTEXTS:
        raise ValueError(f"usage_context must be one of {USAGE_CONTEXTS}, got {usage_context!r}")
    return _TABLE[device_class(device)][usage_context]


def resolve_batch_limits(
    device: DeviceInfo,
    usage_context: str,
    max_num_seqs: int | None,
    max_num_batched_tokens: int | None,
    enable_chunked_prefill: bool,
    max_model_len: int,
) -> BatchLimits:
    """The limits the scheduler runs with: the user's where given, else the table's (clamped).

    A value the user gave is kept as given (validation of it is config.py's)."""
    seqs_default, tokens_default = default_batch_limits(device, usage_context)
    tokens = max_num_batched_tokens
    if tokens is None:
        tokens = tokens_default if enable_chunked_prefill else max(max_model_len, tokens_default)
    seqs = max_num_seqs
    if seqs is None:
        # The CPU row is today's fixed 256, never clamped (tests and users rely on it).
        seqs = seqs_default if device.kind != "cuda" else min(seqs_default, tokens)
    chosen = [name for name, given in (("max_num_seqs", max_num_seqs),
                                       ("max_num_batched_tokens", max_num_batched_tokens)) if given is None]
    source = ("given" if not chosen else
              f"{' and '.join(chosen)} by default for {device.describe()}, {device_class(device)}, "
              f"usage context {usage_context!r}")
    return BatchLimits(seqs, tokens, source)


def probe_device(device: str) -> DeviceInfo:
    """The device the engine will run on, without initializing CUDA in this process if it is not
    already: the server resolves its config in the HTTP process, which must hold no CUDA context
    (it would take GPU memory from the engine process). So a child process reads the properties,
    seeing CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER exactly as the engine will."""
    if device != "cuda":
        return DeviceInfo("cpu")
    import torch

    if torch.cuda.is_initialized():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return DeviceInfo("cuda", props.name, int(props.total_memory))
    code = ("import torch; p = torch.cuda.get_device_properties(0); "
            "print(p.total_memory); print(p.name)")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ))
        return parse_probe_output(done.stdout) if done.returncode == 0 else _unknown(done.stderr)
    except (OSError, subprocess.TimeoutExpired) as e:
        return _unknown(str(e))


def parse_probe_output(text: str) -> DeviceInfo:
    """The child's two lines (total memory in bytes, then the device name) -> DeviceInfo."""
    lines = text.strip().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        return _unknown(f"unexpected probe output {text!r}")
    return DeviceInfo("cuda", lines[1].strip(), int(lines[0].strip()))


def _unknown(reason: str) -> DeviceInfo:
    # As vLLM: a GPU whose properties cannot be read gets the small-GPU row.
    logger.warning("could not read the GPU's properties (%s); using the defaults of a small GPU",
                   reason.strip()[-300:])
    return DeviceInfo("cuda")
