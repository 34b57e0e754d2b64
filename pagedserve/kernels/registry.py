"""The one kernel registry: `get_kernel_set(name)` returns the `KernelSet` a model is built
with (pointwise ops, row argmax, fused GEMV and its limits, attention backend), chosen once at
start-up from the engine's `attention_backend` ("torch" or "triton").

    "torch"  -> kernels/reference.py + TORCH_ATTENTION (the CPU path and the oracle)
    "triton" -> kernels/triton/*.py (GPU)

Nothing here is mutable: the caller keeps the returned set (the loader puts it in the model's
`BuildContext`; the CUDA-graph runner takes its argmax) and no layer looks a kernel up again.
Importing this module never imports Triton: the Triton kernel modules (which need it at import
time for @triton.jit) are imported inside `_triton_kernels`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedserve.kernels import reference, reference_gguf, reference_lut, reference_moe, reference_quant
from pagedserve.kernels.attention_backend import TORCH_ATTENTION, AttentionBackend

__all__ = ["GemvLimits", "KernelSet", "TORCH_KERNELS", "available_kernel_sets", "get_kernel_set",
           "triton_available"]

KERNEL_SET_NAMES = ("torch", "triton")


@dataclass(frozen=True, slots=True)
class GemvLimits:
    """Most tokens for which fused_gemv beats the unfused path, per variant."""

    plain: int  # x @ W.T
    norm: int  # rms_norm(x [+ residual]) @ W.T
    gated: int  # silu(gate) * up of rms_norm(x [+ residual]) @ [W_gate | W_up].T


def _no_wna16_fusion(*, gated: bool) -> int:
    """The torch set folds no norm into its WNA16 matmul (on CPU there is nothing to gain)."""
    del gated
    return 0


@dataclass(frozen=True, slots=True)
class KernelSet:
    name: str
    rms_norm: Callable[..., Any]
    fused_add_rms_norm: Callable[..., Any]
    rotary_embedding: Callable[..., Any]
    silu_and_mul: Callable[..., Any]
    argmax_rows: Callable[..., Any]  # logits [B, V] -> [B] int64 (greedy, in the CUDA graph)
    attention: AttentionBackend
    # fused_gemv(x, weight, bias=, norm_weight=, residual=, eps=, gated=): the small-batch
    # (decode) path of the linear layers, with the RMSNorm before a projection and the
    # SiLU-and-mul after gate_up folded in, used up to the token counts in gemv_limits. None: no
    # such path (the torch set: on CPU there is nothing to gain; tests inject the twin).
    fused_gemv: Callable[..., Any] | None = None
    gemv_limits: GemvLimits = field(default_factory=lambda: GemvLimits(0, 0, 0))
    # fused_moe(x, w13, w2, topk_weights, topk_ids) -> [T, H]: routed experts of an MoE layer
    # (layers/moe.py); torch: reference_moe.fused_moe, triton: kernels/triton/fused_moe.py.
    fused_moe: Callable[..., Any] = reference_moe.fused_moe
    # Weight-only int4/int8 (GPTQ, AWQ after their load-time conversion to the canonical
    # reference_quant.WNA16Weight): wna16_prepare(w) -> this set's own packed form, once per layer
    # after loading; wna16_matmul(x, prepared, bias, norm_weight=, residual=, eps=, gated=) ->
    # y [T, N] (or (y, residual) with norm_weight), the same contract as fused_gemv's extras.
    # wna16_fused_max_tokens(gated=) -> int: up to how many tokens wna16_matmul folds the norm
    # (and, gated, SiLU-and-mul) into one launch; what a WNA16 LinearMethod.fused_max_tokens
    # returns. torch: 0 (the twin takes norm_weight at any T, but there is nothing to gain);
    # triton: kernels/triton/wna16.py (prepare -> PreparedWNA16, GEMV / dequantizing GEMM).
    wna16_prepare: Callable[..., Any] = reference_quant.wna16_prepare
    wna16_matmul: Callable[..., Any] = reference_quant.wna16_matmul
    wna16_fused_max_tokens: Callable[..., int] = _no_wna16_fusion
    # SqueezeLLM: lut_matmul(x, qweight int32 [K/8, N], lookup_table [N, 16], bias) -> y [T, N]
    # (reference_lut.py; triton: a fused LUT GEMV for few tokens, dequantize + cuBLAS beyond).
    lut_matmul: Callable[..., Any] = reference_lut.lut_matmul
    # Both take fused_gemv's extras (norm_weight=, residual=, eps=, gated=) up to these many
    # tokens (0: the layer runs the norm and the activation itself; nothing to gain on CPU).
    lut_fused_max_tokens: int = 0
    gguf_fused_max_tokens: int = 0
    # GGUF blocks kept quantized: gguf_matmul(x, reference_gguf.GGUFWeight, bias) -> y [T, N]
    # (triton: a fused dequantizing GEMV per block type for few tokens, dequantize + cuBLAS beyond).
    gguf_matmul: Callable[..., Any] = reference_gguf.gguf_matmul


TORCH_KERNELS = KernelSet(
    "torch", reference.rms_norm, reference.fused_add_rms_norm, reference.rotary_embedding,
    reference.silu_and_mul, reference.argmax_rows, TORCH_ATTENTION,
)


def triton_available() -> bool:
    """True when the triton package can be imported (the kernels still need a CUDA device, or
    TRITON_INTERPRET=1 set before the first kernel import, to run)."""
    return importlib.util.find_spec("triton") is not None


def _triton_kernels() -> KernelSet:
    if not triton_available():
        raise ImportError("the Triton kernels need the 'triton' package (pip install pagedserve[triton])")
    from pagedserve.kernels.triton.activation import silu_and_mul
    from pagedserve.kernels.triton.argmax import argmax_rows
    from pagedserve.kernels.triton.attention import paged_attention
    from pagedserve.kernels.triton.fused_moe import fused_moe
    from pagedserve.kernels.triton.gemv import MAX_M, fused_gemv, prefer_fused_gemv
    from pagedserve.kernels.triton.gguf_matmul import FUSED_MAX_TOKENS as GGUF_FUSED
    from pagedserve.kernels.triton.gguf_matmul import gguf_matmul
    from pagedserve.kernels.triton.kv_cache import write_kv_cache
    from pagedserve.kernels.triton.lut_gemv import FUSED_MAX_TOKENS as LUT_FUSED
    from pagedserve.kernels.triton.lut_gemv import lut_matmul
    from pagedserve.kernels.triton.norm import fused_add_rms_norm, rms_norm
    from pagedserve.kernels.triton.rotary import rotary_embedding, rotary_write_kv_cache
    from pagedserve.kernels.triton.wna16 import wna16_fused_max_tokens, wna16_matmul, wna16_prepare

    def limit(norm: bool, gated: bool) -> int:
        return max((m for m in range(1, MAX_M + 1) if prefer_fused_gemv(m, norm=norm, gated=gated)),
                   default=0)

    # write_kv = Triton KV scatter; attend = the paged_attention dispatcher (decode / prefill
    # kernels), which takes max_query_len / max_seq_len; rotary_write_kv = fused rotary + KV
    # scatter (one launch per layer instead of two).
    attention = AttentionBackend("triton", write_kv=write_kv_cache, attend=paged_attention,
                                 accepts_max_lens=True, rotary_write_kv=rotary_write_kv_cache)
    return KernelSet("triton", rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul,
                     argmax_rows, attention, fused_gemv=fused_gemv,
                     gemv_limits=GemvLimits(limit(False, False), limit(True, False), limit(True, True)),
                     fused_moe=fused_moe, wna16_prepare=wna16_prepare, wna16_matmul=wna16_matmul,
                     wna16_fused_max_tokens=wna16_fused_max_tokens, lut_matmul=lut_matmul,
                     gguf_matmul=gguf_matmul, lut_fused_max_tokens=LUT_FUSED,
                     gguf_fused_max_tokens=GGUF_FUSED)


def available_kernel_sets() -> list[str]:
    return list(KERNEL_SET_NAMES)


def get_kernel_set(name: str) -> KernelSet:
    """The kernel set called `name`; ValueError for an unknown or (no Triton) unavailable one."""
    if name == "torch":
        return TORCH_KERNELS
    if name == "triton":
        try:
            return _triton_kernels()
        except ImportError as exc:
            raise ValueError(f"attn_backend {name!r} is unavailable here: {exc}") from exc
    raise ValueError(f"attn_backend must be one of {available_kernel_sets()}, got {name!r}")
