"""Qwen2: Llama with q/k/v biases always on (o_proj and MLP without), and a sliding window on the
layers that transformers marks "sliding_attention" (see `layer_sliding_windows`). The differences
live in the "qwen2" adapter of model_spec.py; the module is the same as Llama's."""

from __future__ import annotations

from pagedserve.model_executor.models.llama import LlamaForCausalLM

__all__ = ["Qwen2ForCausalLM"]


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
