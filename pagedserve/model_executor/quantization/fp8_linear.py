"""The FP8 (e4m3) linear method: the checkpoint's tensors (fp8.py), their loading, and two matmuls.

Parameters of one layer (this rank's rows; N = sum of the merged shards' output features):

    weight        float8_e4m3fn [N, K]  (quantization at load time: the model dtype until
                                          process_weights_after_loading quantizes it)
    weight_scale  float32 [N]           every shard's scale, expanded over the shard's rows: a
                                          per-tensor scalar fills its shard, a per-channel
                                          [n] / [n, 1] vector is sliced like the weight rows
    input_scale   float32 [shards]      static activation scheme: one scalar per shard

Merged projections (q/k/v, gate/up) with different per-tensor scales keep their checkpoint
values: the shards' scalars become a per-output-channel scale instead of being requantized to
the largest scale, as vLLM does. Requantizing rounds every element of the other shards again
(up to half an e4m3 step, 6% relative), so the loaded weights would no longer be the
checkpoint's; the per-channel scale costs nothing on the CPU path and is a row-wise scale
(`scale_b` [1, N]) for `torch._scaled_mm`. process_weights_after_loading collapses a scale that
is one value throughout to a scalar (tensor-wise scaling, the fastest GEMM), and the shards'
input scales to their maximum (the shards read the same activations; the largest scale clips
none of them, vLLM's choice too).

The matmul is chosen once, after loading, from the weight's device:
  CUDA with compute capability >= 8.9   torch._scaled_mm: activations quantized to e4m3 with the
                                         static input_scale or dynamically (per tensor; per token
                                         with a row-wise weight scale), K and N padded to
                                         multiples of 16 (its constraint; M is free)
  elsewhere (CPU)                        fp8_linear_torch: the weight dequantized to the model
                                         dtype (product in float32), the activations fake-
                                         quantized through e4m3 with the static input_scale, then
                                         F.linear. The dynamic scheme keeps the activations as
                                         they are (weight-only, as vLLM on GPUs without fp8
                                         GEMMs): the CPU path is the oracle of the dequantized
                                         float model, and _scaled_mm differs from it by the
                                         activation rounding only.
Decode batches (up to the kernel set's GEMV limits) on such a GPU, with dynamic activations, go
to the kernel set's fused_gemv on the e4m3 weight itself (a [N, K] view of the padded weight,
one byte a weight, the scale applied to the float32 dot products; activations not quantized,
as the CPU path), which also folds in the RMSNorm before and the SiLU-and-mul after
(fused_max_tokens). Whether that GEMV is there is decided at construction (the layers ask
fused_max_tokens then): the kernel set has one and the model is built on a GPU with e4m3.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagedserve.kernels.registry import GemvLimits, KernelSet
from pagedserve.model_executor.layers.linear import set_weight_attrs
from pagedserve.model_executor.quantization.base import LinearMethod
from pagedserve.model_executor.quantization.fp8 import Fp8Config

__all__ = ["FP8_DTYPE", "FP8_MAX", "Fp8LinearMethod", "dequantize_fp8", "dynamic_scale",
           "fake_quantize_fp8", "fp8_linear_torch", "quantize_fp8", "scaled_mm_supported"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # an all-zero tensor still gets a finite, positive scale


def quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """x (any float dtype) / scale (float32, broadcastable), in float32, saturated to +-448 -> e4m3."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dynamic_scale(x: Tensor, *, per_token: bool = False) -> Tensor:
    """The scale that maps max |x| to 448: float32 [] (per tensor) or [T, 1] (per row of x [T, K])."""
    amax = x.abs().amax(dim=-1, keepdim=True) if per_token else x.abs().amax()
    return (amax.float() / FP8_MAX).clamp_(min=_MIN_SCALE)


def fake_quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """x through e4m3 and back: e4m3(x / scale) * scale, in x's dtype (the static activation scheme)."""
    return (quantize_fp8(x, scale).float() * scale).to(x.dtype)


def dequantize_fp8(weight: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """weight e4m3 [N, K] times weight_scale [] or [N] (rows), computed in float32 -> [N, K] in dtype."""
    scale = weight_scale if weight_scale.dim() == 0 else weight_scale.reshape(-1, 1)
    return (weight.float() * scale).to(dtype)


def fp8_linear_torch(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor | None,
                     bias: Tensor | None) -> Tensor:
    """x [T, K] -> [T, N]: the plain-torch path and the oracle of the _scaled_mm one (given the
    scale _scaled_mm quantized x with as `input_scale`, they differ by rounding only)."""
    if input_scale is not None:
        x = fake_quantize_fp8(x, input_scale)
    return F.linear(x, dequantize_fp8(weight, weight_scale, x.dtype), bias)


def scaled_mm_supported(device: torch.device) -> bool:
    """torch._scaled_mm needs e4m3 tensor cores: CUDA compute capability 8.9 (Ada) or later."""
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def _builds_on_e4m3_gpu() -> bool:
    """The device the model is being built on (the loader's `with torch.device(...)`) is a CUDA
    GPU with e4m3 support."""
    return scaled_mm_supported(torch.get_default_device())


class Fp8LinearMethod(LinearMethod):
    def __init__(self, config: Fp8Config, kernels: KernelSet | None = None) -> None:
        self.config = config
        # the decode GEMV on e4m3 weights (see the top) and its token limits (0 without it)
        self._gemv: Callable[..., Any] | None = None
        self._limits = GemvLimits(0, 0, 0)
        if (kernels is not None and kernels.fused_gemv is not None and not config.static_activations
                and _builds_on_e4m3_gpu()):  # fmt: skip
            self._gemv, self._limits = kernels.fused_gemv, kernels.gemv_limits
        self._gemv_weight: Tensor | None = None  # [N, K] e4m3 view of the padded weight
        self._gemv_scale: Tensor | None = None  # float32 [1] or [N], a view of the layer's scale
        self._dtype = torch.float32  # the model dtype (create_weights)
        self._impl: Callable[[nn.Module, Tensor], Tensor] | None = None  # process_weights_after_loading
        # the _scaled_mm plan (_prepare_scaled_mm)
        self._n = self._k = 0  # the layer's true out / in features (the weight may be padded)
        self._rowwise = False  # scale_b [1, N] row-wise in the GEMM (per-channel scale, bf16 out)
        self._epilogue = False  # per-channel scale, not bf16: unit-scale GEMM, then y * scale
        self._bias_in_gemm = False
        self._one: Tensor | None = None  # the epilogue's unit scale_b, allocated once (CUDA graphs)

    # ------------------------------------------------------------------ weights and loading

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: Sequence[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype) -> None:
        self._dtype = params_dtype
        rows, cols = sum(output_partition_sizes), input_size_per_partition
        serialized = self.config.serialized
        weight = nn.Parameter(torch.empty(rows, cols, dtype=FP8_DTYPE if serialized else params_dtype),
                              requires_grad=False)
        set_weight_attrs(weight, {"output_dim": 0, "input_dim": 1})
        layer.register_parameter("weight", weight)
        if not serialized:  # loaded in the model dtype by the layer's own loader, quantized later
            return
        set_weight_attrs(weight, {"weight_loader": functools.partial(self._load_weight, layer)})
        scale = nn.Parameter(torch.empty(rows, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(scale, {"output_dim": 0,
                                 "weight_loader": functools.partial(self._load_weight_scale, layer)})
        layer.register_parameter("weight_scale", scale)
        if self.config.static_activations:
            inp = nn.Parameter(torch.empty(len(output_partition_sizes), dtype=torch.float32),
                               requires_grad=False)
            set_weight_attrs(inp, {"weight_loader": functools.partial(self._load_input_scale, layer)})
            layer.register_parameter("input_scale", inp)

    @staticmethod
    def _load_weight(layer: Any, param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
        if loaded.dtype != FP8_DTYPE:
            raise ValueError(f"{layer.prefix}: the fp8 checkpoint's weight is {loaded.dtype}, not "
                             f"float8_e4m3fn; if this module is unquantized it belongs in the "
                             f"quantization_config's ignored_layers")
        layer.weight_loader(param, loaded, shard_id)

    @staticmethod
    def _load_weight_scale(layer: Any, param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
        """A per-tensor scalar fills its shard's rows; a per-channel [n] / [n, 1] vector is
        sliced by the layer's loader like the weight's rows."""
        loaded = loaded.float()
        if loaded.numel() == 1:
            rows = (layer.output_size if shard_id is None
                    else layer.output_sizes[layer.shard_ids.index(shard_id)])
            loaded = loaded.reshape(()).expand(rows)
        elif loaded.dim() == 2 and loaded.shape[1] == 1:
            loaded = loaded[:, 0]
        elif loaded.dim() != 1:
            raise ValueError(f"{layer.prefix}: weight_scale of shape {tuple(loaded.shape)} is neither "
                             f"per tensor ([] / [1]) nor per output channel ([out] / [out, 1])")
        layer.weight_loader(param, loaded, shard_id)

    @staticmethod
    def _load_input_scale(layer: Any, param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"{layer.prefix}: input_scale of shape {tuple(loaded.shape)} is not a "
                             f"per-tensor scalar (the static fp8 activation scheme has one per shard)")
        value = loaded.float().reshape(())
        if shard_id is None:  # an already-fused checkpoint tensor: one scale for every shard
            param.data.copy_(value.expand(param.shape[0]))
        else:
            param.data[layer.shard_ids.index(shard_id)] = value

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = cast(Tensor, layer.weight).data
        if self.config.serialized:
            scale = cast(Tensor, layer.weight_scale).data
            if bool((scale == scale[0]).all()):  # one scale throughout: tensor-wise
                scale = scale[0].clone()
        else:  # quantization at load time: one scale for this rank's (merged) weight
            scale = dynamic_scale(weight)
            weight = quantize_fp8(weight, scale)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if self.config.static_activations:
            layer.input_scale = nn.Parameter(cast(Tensor, layer.input_scale).data.amax(),
                                             requires_grad=False)
        else:
            layer.register_parameter("input_scale", None)  # dynamic: scaled per call
        if scaled_mm_supported(weight.device):
            self._prepare_scaled_mm(layer)
            self._impl = self._apply_scaled_mm
        else:
            self._impl = self._apply_torch
        if self._gemv is not None:
            if not scaled_mm_supported(weight.device):
                raise RuntimeError(f"fp8: the decode GEMV was planned for a CUDA device with e4m3 support, "
                                   f"but the weight is on {weight.device}")
            self._prepare_gemv(layer)

    # ------------------------------------------------------------------ compute

    def apply(self, layer: nn.Module, x: Tensor, *, norm: nn.Module | None = None,
              residual: Tensor | None = None, gated: bool = False) -> Any:
        assert self._impl is not None, "process_weights_after_loading has not run"
        gemv, weight = self._gemv, self._gemv_weight
        if norm is None:
            if gemv is not None and x.dim() == 2 and 0 < x.shape[0] <= self._limits.plain:
                return gemv(x, weight, bias=layer.bias, weight_scale=self._gemv_scale)
            return self._impl(layer, x)
        assert gemv is not None  # only called within fused_max_tokens, > 0 with the GEMV
        return gemv(x, weight, bias=layer.bias, weight_scale=self._gemv_scale, norm_weight=norm.weight,
                    residual=residual, eps=norm.eps, gated=gated)

    def fused_max_tokens(self, *, gated: bool) -> int:
        return self._limits.gated if gated else self._limits.norm

    def _apply_torch(self, layer: nn.Module, x: Tensor) -> Tensor:
        return fp8_linear_torch(x, cast(Tensor, layer.weight), cast(Tensor, layer.weight_scale),
                                cast("Tensor | None", layer.input_scale),
                                cast("Tensor | None", layer.bias))

    def _prepare_scaled_mm(self, layer: nn.Module) -> None:
        """Pad the weight to [N16, K16] (zero rows / columns; padded scales are 1) and keep its
        transpose, the column-major [K16, N16] operand _scaled_mm wants; lay the scale out as
        scale_b: [] (tensor-wise) or [1, N16] (row-wise / epilogue)."""
        weight = cast(Tensor, layer.weight).data
        scale = cast(Tensor, layer.weight_scale).data
        n, k = weight.shape
        self._n, self._k = n, k
        n16, k16 = _round16(n), _round16(k)
        if (n16, k16) != (n, k):
            weight = F.pad(weight.view(torch.uint8), (0, k16 - k, 0, n16 - n)).view(FP8_DTYPE)
        per_channel = scale.dim() == 1
        if per_channel:
            scale = F.pad(scale, (0, n16 - n), value=1.0).reshape(1, n16).contiguous()
        layer.weight = nn.Parameter(weight.t(), requires_grad=False)  # [K16, N16], column-major
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        self._rowwise = per_channel and self._dtype == torch.bfloat16
        self._epilogue = per_channel and not self._rowwise
        self._one = torch.ones((), dtype=torch.float32, device=weight.device)
        # _scaled_mm takes a bias of the output dtype, never with a float32 output
        self._bias_in_gemm = (layer.bias is not None and n16 == n and not self._epilogue
                              and self._dtype in (torch.bfloat16, torch.float16))

    def _prepare_gemv(self, layer: nn.Module) -> None:
        """Views for the decode GEMV, after _prepare_scaled_mm: the weight [N, K] (rows of the
        padded row-major [N16, K16] whose transpose _scaled_mm reads) and its scale, float32 [1]
        (tensor-wise) or [N]. No copy: the GEMV and the GEMM read the same bytes."""
        weight_t, scale_b = cast(Tensor, layer.weight), cast(Tensor, layer.weight_scale)
        self._gemv_weight = weight_t.t()[:self._n, :self._k]
        self._gemv_scale = scale_b.reshape(1) if scale_b.dim() == 0 else scale_b.reshape(-1)[:self._n]

    def _apply_scaled_mm(self, layer: nn.Module, x: Tensor) -> Tensor:
        weight_t, scale_b = cast(Tensor, layer.weight), cast(Tensor, layer.weight_scale)
        bias = cast("Tensor | None", layer.bias)
        input_scale = cast("Tensor | None", layer.input_scale)
        k_pad = weight_t.shape[0] - self._k
        if k_pad:
            x = F.pad(x, (0, k_pad))  # zero columns meet the weight's zero rows
        m = x.shape[0]
        if input_scale is not None:  # static: [] or, row-wise, the same value per row [M, 1]
            scale_a = input_scale.repeat(m, 1) if self._rowwise else input_scale  # strides (1, 1)
        else:
            scale_a = dynamic_scale(x, per_token=self._rowwise)
        xq = quantize_fp8(x, scale_a)
        if self._epilogue:
            y = torch._scaled_mm(xq, weight_t, scale_a=scale_a, scale_b=cast(Tensor, self._one),
                                 out_dtype=torch.float32)
            y = y * scale_b
        else:
            y = torch._scaled_mm(xq, weight_t, scale_a=scale_a, scale_b=scale_b,
                                 bias=bias if self._bias_in_gemm else None,
                                 out_dtype=self._dtype)
        if y.shape[1] != self._n:
            y = y[:, :self._n]
        if bias is not None and not self._bias_in_gemm:
            y = y + bias
        return y.to(self._dtype)
