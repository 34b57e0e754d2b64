"""Qwen3: per-head RMSNorm (`q_norm`, `k_norm` over head_dim) on q and k before rotary; explicit
head_dim; q/k/v/o biases follow `attention_bias` (off by default; the "qwen3" adapter of
model_spec.py reads it); Qwen2's sliding-window rules."""

from __future__ import annotations

from torch import nn

from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import dense_rope_layer
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec
from pagedserve.model_executor.models.base import DecoderForCausalLM

__all__ = ["Qwen3ForCausalLM"]


class Qwen3ForCausalLM(DecoderForCausalLM):
    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                   ctx: BuildContext) -> nn.Module:
        return dense_rope_layer(spec, layer_idx, rotary, ctx, qk_norm=True)
