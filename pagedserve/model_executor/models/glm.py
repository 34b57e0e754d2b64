"""GLM in the transformers-native layouts: GlmForCausalLM (GLM-4-9B "-hf" checkpoints) and
Glm4ForCausalLM (GLM-4-0414). Both are the dense rotary block with rotary on interleaved pairs
over half of each head (spec.rope, the "glm"/"glm4" adapter of model_spec.py), q/k/v biases and a
fused gate_up_proj checkpoint tensor (loaded whole, split into its two shards).

Glm4 adds sandwich norms: post_self_attn_layernorm on the attention output and post_mlp_layernorm
on the MLP output, each before its residual add:

    h = r + post_self_attn_layernorm(attn(input_layernorm(r)))
    out = h + post_mlp_layernorm(mlp(post_attention_layernorm(h)))
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from pagedserve.model_executor.layers.attention import AttentionMetadata
from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import DecoderLayer, KVCache, dense_rope_layer
from pagedserve.model_executor.layers.norm import RMSNorm
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec
from pagedserve.model_executor.models.base import DecoderForCausalLM

__all__ = ["Glm4ForCausalLM", "GlmForCausalLM"]


class GlmForCausalLM(DecoderForCausalLM):
    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                   ctx: BuildContext) -> nn.Module:
        return dense_rope_layer(spec, layer_idx, rotary, ctx)


class _SandwichLayer(nn.Module):
    """A dense rotary layer whose attention and MLP outputs are RMS-normed before their residual
    adds. Same (hidden, residual) contract as DecoderLayer: returns (normed mlp output, residual
    stream before it); the next norm adds them."""

    def __init__(self, inner: DecoderLayer, hidden_size: int, eps: float, *, ctx: BuildContext) -> None:
        super().__init__()
        # the inner layer's modules keep their checkpoint names (self_attn, mlp, input_layernorm,
        # post_attention_layernorm) at this level
        self.self_attn = inner.self_attn
        self.mlp = inner.mlp
        self.input_layernorm = inner.input_layernorm
        self.post_attention_layernorm = inner.post_attention_layernorm
        self.post_self_attn_layernorm = RMSNorm(hidden_size, eps, ctx=ctx.child("post_self_attn_layernorm"))
        self.post_mlp_layernorm = RMSNorm(hidden_size, eps, ctx=ctx.child("post_mlp_layernorm"))

    def forward(self, positions: Tensor, hidden: Tensor, residual: Tensor | None,
                kv_cache: KVCache | None, attn_metadata: AttentionMetadata) -> tuple[Tensor, Tensor]:
        out, residual = self.self_attn(positions, hidden, residual, self.input_layernorm,
                                       kv_cache, attn_metadata)
        out = cast(Tensor, self.post_self_attn_layernorm(out))
        out, residual = self.mlp(out, residual, self.post_attention_layernorm)
        return cast(Tensor, self.post_mlp_layernorm(out)), residual


class Glm4ForCausalLM(DecoderForCausalLM):
    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                   ctx: BuildContext) -> nn.Module:
        inner = dense_rope_layer(spec, layer_idx, rotary, ctx)
        return _SandwichLayer(inner, spec.hidden_size, spec.norm_eps, ctx=ctx)
