"""GGUF weights kept quantized on the device: `quantization="gguf"` on a .gguf checkpoint.

Without it, gguf_loader.py dequantizes every tensor at load (the model then holds dtype weights).
With it, every linear projection whose tensors are of a type in reference_gguf.GGUF_BLOCKS
(Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) keeps its raw llama.cpp blocks, one row per output feature:

    qweight  uint8 [N, K / B * S]       (output_dim 0, input_dim 1: a row-parallel rank's slice
                                         of K is a whole number of blocks, so of bytes)

and multiplies through the kernel set's `gguf_matmul`. Everything else is dequantized at load as
before: embeddings, norms, the LM head (it stays a dtype matrix), and projections of another type
(Q5_0, Q5_1, Q2_K, Q3_K, Q5_K; logged once per type). llama.cpp's Q/K rotary permutation acts on
output features, so gguf_loader undoes it by permuting whole rows of blocks: exact.

Merged projections (qkv, gate_up) may mix types (Q4_K_M files store v in Q6_K, q and k in Q4_K):

    qweight [q rows | k rows | v rows, max row bytes]   each shard's rows left-aligned, zero padded
    after loading: one contiguous [rows, row bytes] tensor per run of shards of one type
    (qkv: [q|k] in Q4_K and [v] in Q6_K), multiplied separately and concatenated.

The same applies without the flag on a GPU when the dequantized weights would not fit in the
device's free memory (`auto_gguf_config`; the loader is not given the engine's
gpu_memory_utilization budget, so it compares against free memory).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagedserve.kernels.reference_gguf import GGUF_BLOCKS, GGUFWeight, row_bytes
from pagedserve.kernels.registry import KernelSet
from pagedserve.model_executor.layers.linear import set_weight_attrs
from pagedserve.model_executor.quantization.base import LinearMethod, QuantConfig, register_quant_config

if TYPE_CHECKING:
    from pagedserve.model_executor.model_spec import ModelSpec

__all__ = ["GGUFConfig", "GGUFLinearMethod", "auto_gguf_config", "dequantized_bytes"]

logger = logging.getLogger(__name__)


class GGUFLinearMethod(LinearMethod):
    """Raw GGUF blocks per shard type (see the module docstring). The decode fusion (RMSNorm
    before, SiLU-and-mul after) runs in the kernel set's gguf_matmul up to its
    gguf_fused_max_tokens, for layers whose shards share one type (one weight)."""

    def __init__(self, kernels: KernelSet, qtypes: Sequence[str]) -> None:
        self._matmul = kernels.gguf_matmul  # bound once
        self.qtypes = list(qtypes)  # per shard of the layer, in shard order
        self._fused_max_tokens = kernels.gguf_fused_max_tokens if len(set(qtypes)) == 1 else 0
        self.weights: list[GGUFWeight] = []  # per run of same-type shards, after loading
        self._splits: list[int] = []  # output features of each run

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: Sequence[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        if len(self.qtypes) != len(output_partition_sizes):
            raise ValueError(f"gguf: {len(self.qtypes)} shard types for {len(output_partition_sizes)} shards")
        widths = [row_bytes(t, input_size_per_partition) for t in self.qtypes]
        width = max(widths)
        qweight = nn.Parameter(torch.empty(sum(output_partition_sizes), width, dtype=torch.uint8),
                               requires_grad=False)
        set_weight_attrs(qweight, {"output_dim": 0, "input_dim": 1})
        shard_ids = list(cast(Any, layer).shard_ids)
        expected = dict(zip(shard_ids, widths, strict=True))

        def load(param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
            """Left-align a shard's rows in the (max-width) parameter, then the layer's loader."""
            if loaded.dtype != torch.uint8:
                raise ValueError(f"{layer.prefix}: expected raw GGUF blocks (uint8), got {loaded.dtype}")
            sid = shard_id if shard_id is not None else shard_ids[0]
            if len(set(widths)) > 1:  # mixed types: merged column layer, K is whole here
                if loaded.shape[1] != expected[sid]:
                    raise ValueError(f"{layer.prefix}: shard {sid!r} has {loaded.shape[1]} bytes per row, "
                                     f"its type {self.qtypes[shard_ids.index(sid)]} needs {expected[sid]}")
                loaded = F.pad(loaded, (0, width - loaded.shape[1]))
            cast(Any, layer).weight_loader(param, loaded, shard_id)

        set_weight_attrs(qweight, {"weight_loader": load})
        layer.register_parameter("qweight", qweight)
        self._shard_rows = list(output_partition_sizes)
        self._k = input_size_per_partition

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        data = cast(Tensor, layer.qweight).data
        runs: list[tuple[str, int, int]] = []  # (type, first row, rows)
        row = 0
        for qtype, rows in zip(self.qtypes, self._shard_rows, strict=True):
            if runs and runs[-1][0] == qtype:
                runs[-1] = (qtype, runs[-1][1], runs[-1][2] + rows)
            else:
                runs.append((qtype, row, rows))
            row += rows
        if len(runs) == 1:  # one type: the parameter is the weight, as loaded
            self.weights = [GGUFWeight(data, runs[0][0], self._k)]
        else:
            del layer.qweight
            for i, (qtype, first, rows) in enumerate(runs):
                part = data[first:first + rows, :row_bytes(qtype, self._k)].contiguous()
                layer.register_buffer(f"qweight_{i}", part, persistent=False)
                self.weights.append(GGUFWeight(part, qtype, self._k))
        self._splits = [r for _, _, r in runs]

    def apply(self, layer: nn.Module, x: Tensor, *, norm: nn.Module | None = None,
              residual: Tensor | None = None, gated: bool = False) -> Any:
        bias = cast("Tensor | None", layer.bias)
        if norm is not None:  # within fused_max_tokens: one weight
            return self._matmul(x, self.weights[0], bias, norm_weight=norm.weight, residual=residual,
                                eps=norm.eps, gated=gated)
        if len(self.weights) == 1:
            return self._matmul(x, self.weights[0], bias)
        biases = bias.split(self._splits) if bias is not None else [None] * len(self.weights)
        return torch.cat([self._matmul(x, w, b) for w, b in zip(self.weights, biases, strict=True)], dim=-1)

    def fused_max_tokens(self, *, gated: bool) -> int:
        return self._fused_max_tokens


def _tensor_types(file: str) -> dict[str, tuple[str, int]]:
    """Hugging Face weight name -> (GGUF type name, element count) for every tensor of `file`."""
    from pagedserve.model_executor.gguf_loader import _reader, gguf_to_hf_name

    out: dict[str, tuple[str, int]] = {}
    for tensor in _reader(file).tensors:
        name = gguf_to_hf_name(tensor.name)
        if name is not None:
            out[name] = (tensor.tensor_type.name, int(tensor.n_elements))
    return out


@register_quant_config
class GGUFConfig(QuantConfig):
    name: ClassVar[str] = "gguf"

    def __init__(self, file: str) -> None:
        self.file = file
        self.types = _tensor_types(file)
        # HF weight names whose layer keeps the blocks: filled while the model is built
        # (get_method), read by gguf_loader.iterate_gguf once the weights start streaming.
        self.kept: set[str] = set()
        self._logged: set[str] = set()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GGUFConfig:
        file = config.get("gguf_file")
        if not isinstance(file, str):
            raise ValueError("quantization 'gguf' applies to a .gguf checkpoint; no gguf_file given")
        return cls(file)

    @classmethod
    def for_unquantized_checkpoint(cls, model_dir: str | None, spec: ModelSpec | None) -> GGUFConfig:
        from pagedserve.model_executor.gguf_loader import find_gguf_file

        file = find_gguf_file(model_dir) if model_dir is not None else None
        if file is None:
            raise ValueError(f"quantization='gguf' keeps a GGUF file's blocks quantized; "
                             f"{model_dir!r} is no .gguf checkpoint")
        return cls(file)

    def get_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        if prefix.rpartition(".")[2] == "lm_head":
            return None  # the LM head stays dequantized (a dtype matrix)
        names = [f"{p}.weight" for p in self.checkpoint_prefixes(prefix)]
        found = [self.types.get(n) for n in names]
        if any(f is None for f in found):
            return None
        qtypes = [cast(tuple[str, int], f)[0] for f in found]
        k = int(cast(Any, layer).input_size_per_partition)
        unkept = sorted({t for t in qtypes if t not in GGUF_BLOCKS or k % GGUF_BLOCKS[t][1]})
        if unkept:
            for t in unkept:
                if t not in self._logged and t not in ("F32", "F16", "BF16"):
                    self._logged.add(t)
                    logger.info("gguf: %s tensors (%s, ...) have no quantized kernel here; they are "
                                "dequantized at load", t, prefix)
            return None
        kernels = getattr(layer, "kernels", None)
        if kernels is None:
            raise RuntimeError("the linear layer carries no kernel set (LinearBase sets layer.kernels)")
        self.kept.update(names)
        return GGUFLinearMethod(cast(KernelSet, kernels), qtypes)


def dequantized_bytes(file: str, dtype: torch.dtype) -> int:
    """Bytes the file's tensors take dequantized to `dtype` (what the default path allocates)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(n for _, n in _tensor_types(file).values()) * size


def auto_gguf_config(file: str, dtype: torch.dtype, device: torch.device,
                     budget_bytes: int | None = None) -> GGUFConfig | None:
    """A GGUFConfig when the file's weights dequantized to `dtype` exceed `budget_bytes` (default:
    the CUDA device's free memory; off a GPU: None, always dequantize)."""
    if budget_bytes is None:
        if device.type != "cuda":
            return None
        budget_bytes = int(torch.cuda.mem_get_info(device)[0])
    need = dequantized_bytes(file, dtype)
    if need <= budget_bytes:
        return None
    logger.info("gguf: the weights take %.2f GiB dequantized, over the %.2f GiB budget: keeping "
                "them quantized (as quantization='gguf')", need / 2**30, budget_bytes / 2**30)
    return GGUFConfig(file)
