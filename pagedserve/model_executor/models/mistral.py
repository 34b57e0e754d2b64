"""Mistral: Llama with a sliding window (`sliding_window`, may be None) on every layer and no
projection biases (transformers' Mistral ignores attention_bias)."""

from __future__ import annotations

from typing import Any

from pagedserve.model_executor.models.llama import DecoderFlags, LlamaForCausalLM

__all__ = ["MistralForCausalLM"]


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_flags(cls, config: Any) -> DecoderFlags:
        window = getattr(config, "sliding_window", None)
        return DecoderFlags(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False,
                            sliding_windows=[window] * config.num_hidden_layers)
