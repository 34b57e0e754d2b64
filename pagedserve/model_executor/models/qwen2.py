"""Qwen2: Llama with q/k/v biases always on (o_proj and MLP without), and a sliding window on the
layers that transformers marks "sliding_attention" (see `layer_sliding_windows`)."""

from __future__ import annotations

from typing import Any

from pagedserve.model_executor.models.llama import DecoderFlags, LlamaForCausalLM, layer_sliding_windows

__all__ = ["Qwen2ForCausalLM"]


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_flags(cls, config: Any) -> DecoderFlags:
        return DecoderFlags(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False,
                            sliding_windows=layer_sliding_windows(config))
