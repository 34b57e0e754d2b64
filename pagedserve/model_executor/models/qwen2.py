"""Qwen2: the Llama block with q/k/v biases always on (o_proj and MLP without; the "qwen2"
adapter of model_spec.py sets them) and a sliding window on the layers transformers marks
"sliding_attention" (spec.sliding_windows, see `layer_sliding_windows`)."""

from __future__ import annotations

from torch import nn

from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import dense_rope_layer
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec
from pagedserve.model_executor.models.base import DecoderForCausalLM

__all__ = ["Qwen2ForCausalLM"]


class Qwen2ForCausalLM(DecoderForCausalLM):
    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                   ctx: BuildContext) -> nn.Module:
        return dense_rope_layer(spec, layer_idx, rotary, ctx)
