"""Qwen3: per-head RMSNorm (`q_norm`, `k_norm` over head_dim) on q and k before rotary; explicit
head_dim; q/k/v/o biases follow `attention_bias` (off by default); Qwen2 sliding-window rules."""

from __future__ import annotations

from typing import Any

from pagedserve.model_executor.models.llama import DecoderFlags, LlamaForCausalLM, layer_sliding_windows

__all__ = ["Qwen3ForCausalLM"]


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_flags(cls, config: Any) -> DecoderFlags:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderFlags(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True,
                            sliding_windows=layer_sliding_windows(config))
