"""Mistral: Llama with a sliding window (`sliding_window`, may be None) on every layer and no
projection biases (transformers' Mistral ignores attention_bias). The differences live in the
"mistral" adapter of model_spec.py; the module is the same as Llama's."""

from __future__ import annotations

from pagedserve.model_executor.models.llama import LlamaForCausalLM

__all__ = ["MistralForCausalLM"]


class MistralForCausalLM(LlamaForCausalLM):
    pass
