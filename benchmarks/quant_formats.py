"""Helpers of benchmarks/quant_gpu.py: a checkpoint packed in a named format, and the bytes a
loaded model holds (what is read per decode token, for the bandwidth floors).

    path = pack_format("gptq4", src, dst, group=128, device="cuda")   # src itself for bf16 / fp8-load
    mem = weight_memory(model, tied)   # {"total", "linear", "lm_head", "embedding", "other",
                                       #  "rotary", "read_per_token"}: bytes
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pagedserve.testing.quant_pack.common import QuantizedTensor, TensorQuantizer, quantize_checkpoint

__all__ = ["PACKED", "pack_format", "squeezellm_chunked", "weight_memory"]

PACKED = ("gptq4", "gptq8", "awq4", "fp8", "squeezellm")  # the formats written by a packer
_CHUNK_ROWS = 1024  # SqueezeLLM: output rows per chunk (its nearest-level search is [rows, K, 16])


def squeezellm_chunked(module: str, w: Tensor) -> QuantizedTensor:
    """squeezellm_quantize over chunks of output rows (every row has its own table, so the result
    is the same): bounds the [rows, K, 16] float32 search (3.8 GB for one [14336, 4096] weight)."""
    from pagedserve.testing.quant_pack.squeezellm import squeezellm_quantize

    parts = [squeezellm_quantize(module, chunk) for chunk in w.split(_CHUNK_ROWS, dim=0)]
    qweight = torch.cat([p.tensors["qweight"] for p in parts], dim=1)  # [K/8, N]: N along dim 1
    table = torch.cat([p.tensors["lookup_table"] for p in parts], dim=0)  # [N, 16]
    return QuantizedTensor({"qweight": qweight, "lookup_table": table},
                           torch.cat([p.dequantized for p in parts], dim=0))


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
        return squeezellm_chunked, QUANT_CONFIG
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
