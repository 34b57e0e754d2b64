"""Helpers of benchmarks/quant_gpu.py: a checkpoint packed in a named format, the bytes a loaded
model holds (what is read per decode token, for the bandwidth floors), and the run's plumbing
(copy bandwidth, per-format error rows, rows merged over calls, the PNG).

    path = pack_format("gptq4", src, dst, group=128, device="cuda")   # src itself for bf16 / fp8-load
    mem = weight_memory(model, tied)   # {"total", "linear", "lm_head", "embedding", "other",
                                       #  "rotary", "read_per_token"}: bytes
"""

from __future__ import annotations

import gc
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import measure_copy_bandwidth
from pagedserve.kernels.reference_lut import LUT_SIZE, dequantize_lut
from pagedserve.kernels.reference_quant import pack_along_rows
from pagedserve.testing.quant_pack.common import QuantizedTensor, TensorQuantizer, quantize_checkpoint

__all__ = ["PACKED", "copy_bandwidth", "free", "guarded", "merged", "pack_format", "plot", "squeezellm_kmeans",
           "weight_memory"]

PACKED = ("gptq4", "gptq8", "awq4", "fp8", "squeezellm")  # the formats written by a packer
_CHUNK_ROWS = 1024  # SqueezeLLM: output rows per chunk (the nearest-level search is [rows, K, 16])


def squeezellm_kmeans(module: str, w: Tensor, iterations: int = 10) -> QuantizedTensor:
    """w float32 [N, K] in SqueezeLLM's published layout (qweight int32 [K/8, N] of 4-bit indices,
    lookup_table fp16 [N, 16]), the table of each output channel from 1-D k-means over its row
    (Lloyd's iterations from the test packer's 16 quantiles; SqueezeLLM itself weights them by
    sensitivity). The packer's quantiles alone clip every row's outliers to its 97th percentile:
    a perplexity of ~1e5 on SmolLM2-135M; k-means gives 161.8 there, against 67.7 for 4-bit
    round-to-nearest GPTQ at group 64 (benchmarks/results/cpu-2026-12-02-smollm2-perplexity/):
    one unweighted table per output channel is no match for per-group scales. Output rows go in
    chunks (each has its own table), which bounds the [rows, K, 16] distance tensor."""
    del module
    levels = (torch.arange(LUT_SIZE, dtype=torch.float32) + 0.5) / LUT_SIZE
    tables, indices = [], []
    for chunk in w.split(_CHUNK_ROWS, dim=0):
        table = torch.quantile(chunk, levels, dim=1).t().contiguous()  # [rows, 16]
        for _ in range(iterations):
            idx = (chunk[:, :, None] - table[:, None, :]).abs().argmin(dim=2)  # [rows, K]
            sums = torch.zeros_like(table).scatter_add_(1, idx, chunk)
            counts = torch.zeros_like(table).scatter_add_(1, idx, torch.ones_like(chunk))
            table = torch.where(counts > 0, sums / counts.clamp(min=1), table)  # empty: kept
        table16 = table.to(torch.float16)  # the stored table; indices are nearest to it
        indices.append((chunk[:, :, None] - table16.float()[:, None, :]).abs().argmin(dim=2))
        tables.append(table16)
    table16 = torch.cat(tables)
    qweight = pack_along_rows(torch.cat(indices).t().contiguous(), 4)  # [K/8, N]
    return QuantizedTensor({"qweight": qweight, "lookup_table": table16},
                           dequantize_lut(qweight, table16).float())


def _quantizer(fmt: str, group: int) -> tuple[TensorQuantizer, dict[str, Any]]:
    from pagedserve.testing.quant_pack.awq import awq_config, awq_quantizer
    from pagedserve.testing.quant_pack.fp8 import fp8_quantizer
    from pagedserve.testing.quant_pack.gptq import gptq_config, gptq_quantizer
    from pagedserve.testing.quant_pack.squeezellm import QUANT_CONFIG

    if fmt in ("gptq4", "gptq8"):
        bits = int(fmt[-1])
        return gptq_quantizer(bits, group, sym=True), gptq_config(bits, group, sym=True)
    if fmt == "awq4":
        return awq_quantizer(group), awq_config(group)
    if fmt == "fp8":  # per-channel weight scales, activations scaled per call
        return fp8_quantizer(scales="channel"), {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                  "ignored_layers": []}
    if fmt == "squeezellm":
        return squeezellm_kmeans, QUANT_CONFIG
    raise ValueError(f"no packer for {fmt!r} (packed formats: {', '.join(PACKED)})")


def pack_format(fmt: str, src: str | Path, dst: str | Path, *, group: int, device: str | None) -> str:
    """The checkpoint directory to load for `fmt`: `src` itself for the formats that load the
    unquantized checkpoint (bf16, fp8-load), else `dst`, written by the format's packer (its
    round-to-nearest math on `device`); lm_head and embeddings stay unquantized."""
    if fmt not in PACKED:
        return str(src)
    quantizer, config = _quantizer(fmt, group)
    quantize_checkpoint(src, dst, quantizer, config, device=device, keep_dequantized=False)
    return str(dst)


# ---------------------------------------------------------------------------------- run helpers

def free() -> None:
    """Give the memory of what the caller has just dropped back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_bandwidth(device: str) -> float:
    """Copy bandwidth in bytes/s (read + written): the device's, or on the CPU a 64 MiB memcpy."""
    if device == "cuda":
        return measure_copy_bandwidth()
    src = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / sorted(times)[len(times) // 2]


def guarded(fmt: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One format's row, or its error (printed), so that one failing format does not cost the
    others their measurements in an unattended device call."""
    try:
        return run()
    except Exception as exc:  # reported in the row and on stderr
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
    free()  # after the except block: its traceback (holding the failed engine) is gone
    return {"format": fmt, "error": error}


def merged(path: str | None, key: str, rows: list[dict[str, Any]], order: tuple[str, ...]) -> list[dict[str, Any]]:
    """This run's rows over those an earlier call wrote into `path` (by format; ours win), in
    `order`."""
    old: list[dict[str, Any]] = []
    if path and os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get(key, [])
    ours = {r["format"] for r in rows}
    out = [r for r in old if r["format"] not in ours] + rows
    return sorted(out, key=lambda r: order.index(r["format"]) if r["format"] in order else len(order))


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """tokens/s per format at batch 1 / 16 / 64 (bars) with each one's bandwidth floor (ticks)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    rows = [r for r in rows if "error" not in r]
    names = [r["format"] for r in rows]
    for ax, b in zip(axes, (1, 16, 64)):
        rates = [r[f"b{b}_tok_s"] for r in rows]
        floors = [r[f"b{b}_floor_tok_s"] for r in rows]
        bars = ax.bar(names, rates, color="tab:blue", label="measured")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.scatter(names, floors, marker="_", s=900, color="tab:red", label="bandwidth floor", zorder=3)
        ax.set_title(f"decode, batch {b}, context 128")
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", rotation=30)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- memory

def _tensors(obj: Any, depth: int, seen: set[int]) -> Iterator[Tensor]:
    """Tensors reachable from one attribute value: itself, the items of containers, and the
    fields of pagedserve objects (linear methods, prepared weights such as PreparedWNA16 or
    GGUFWeight); modules are walked on their own, other objects (functions, configs) not."""
    if isinstance(obj, Tensor):
        yield obj
        return
    if depth == 0 or isinstance(obj, nn.Module) or id(obj) in seen:
        return
    seen.add(id(obj))
    children: list[Any] = []
    if isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif type(obj).__module__.startswith("pagedserve."):
        children = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
        for cls in type(obj).__mro__:
            children += [getattr(obj, s, None) for s in getattr(cls, "__slots__", ())]
    for child in children:
        yield from _tensors(child, depth - 1, seen)


def _category(name: str, module: nn.Module) -> str:
    from pagedserve.model_executor.layers.embedding import VocabParallelEmbedding
    from pagedserve.model_executor.layers.linear import LinearBase
    from pagedserve.model_executor.layers.rotary import RotaryEmbedding

    if name.endswith("lm_head"):
        return "lm_head"
    if isinstance(module, VocabParallelEmbedding):
        return "embedding"
    if isinstance(module, LinearBase):
        return "linear"
    if isinstance(module, RotaryEmbedding):
        return "rotary"
    return "other"  # norms


def weight_memory(model: nn.Module, tied: bool) -> dict[str, int]:
    """Bytes of every storage the model's modules hold (parameters, buffers, and tensors kept in
    attributes: the kernels' prepared weights), each storage counted once, under the first module
    (in named_modules order) that holds it. read_per_token = what one decode step reads: the
    projections (weights and their scales / zeros / tables), the LM head and the norms; not the
    embedding table (one row is gathered) unless tied to the LM head, nor the rotary cache."""
    sizes = dict.fromkeys(("linear", "lm_head", "embedding", "rotary", "other"), 0)
    storages: set[int] = set()
    for name, module in model.named_modules():
        kind = _category(name, module)
        values = [v for k, v in vars(module).items() if k not in ("_modules", "kernels")]
        seen: set[int] = set()
        for value in values:
            for t in _tensors(value, 6, seen):
                if t.device.type == "meta":
                    continue
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in storages:
                    storages.add(storage.data_ptr())
                    sizes[kind] += storage.nbytes()
    read = sizes["linear"] + sizes["lm_head"] + sizes["other"] + (sizes["embedding"] if tied else 0)
    return {**sizes, "total": sum(sizes.values()), "read_per_token": read}
