"""Mistral: the Llama block with one sliding window (`sliding_window`, may be None) on every
layer and no projection biases (transformers' Mistral ignores attention_bias); the "mistral"
adapter of model_spec.py gives both."""

from __future__ import annotations

from torch import nn

from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import dense_rope_layer
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec
from pagedserve.model_executor.models.base import DecoderForCausalLM

__all__ = ["MistralForCausalLM"]


class MistralForCausalLM(DecoderForCausalLM):
    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                   ctx: BuildContext) -> nn.Module:
        return dense_rope_layer(spec, layer_idx, rotary, ctx)
