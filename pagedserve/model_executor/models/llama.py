"""Llama 2/3/3.1 (and DeepSeek-LLM, Yi, ...): rotary attention with optional q/k/v/o biases
(`attention_bias`), a gated SiLU MLP (optional `mlp_bias`), RMSNorm; all numbers from the spec."""

from __future__ import annotations

from torch import nn

from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import dense_rope_layer
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec, layer_sliding_windows
from pagedserve.model_executor.models.base import DecoderForCausalLM

__all__ = ["LlamaForCausalLM", "layer_sliding_windows"]


class LlamaForCausalLM(DecoderForCausalLM):
    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                   ctx: BuildContext) -> nn.Module:
        return dense_rope_layer(spec, layer_idx, rotary, ctx)
