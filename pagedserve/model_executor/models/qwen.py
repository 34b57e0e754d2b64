"""Qwen (v1: Qwen-7B/14B/72B(-Chat), `QWenLMHeadModel`, model_type "qwen", published as remote code).

The math is the Qwen2 block: RMSNorm, rotary attention with a bias on the fused q|k|v projection
and none on the output, and a SiLU-gated MLP. Only names differ; the "qwen" adapter of
model_spec.py maps them (its `checkpoint_names`):

    transformer.wte                      -> model.embed_tokens
    transformer.h.N.ln_1 / ln_2          -> model.layers.N.input_layernorm / post_attention_layernorm
    transformer.h.N.attn.c_attn [3D, D]  -> ...self_attn.qkv_proj (already fused q|k|v, loads whole)
    transformer.h.N.attn.c_proj          -> ...self_attn.o_proj
    transformer.h.N.mlp.w2 / w1          -> ...mlp.gate_up_proj shards 0 (gate) / 1 (up)
    transformer.h.N.mlp.c_proj           -> ...mlp.down_proj
    transformer.ln_f                     -> model.norm

QWenMLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up branch. The published config's
`intermediate_size` counts both branches (the adapter halves it). `use_dynamic_ntk` and
`use_logn_attn` only act beyond `seq_length`, which the adapter makes the context limit.
"""

from __future__ import annotations

from torch import nn

from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import dense_rope_layer
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec
from pagedserve.model_executor.models.base import DecoderForCausalLM

__all__ = ["QWenLMHeadModel"]


class QWenLMHeadModel(DecoderForCausalLM):
    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                   ctx: BuildContext) -> nn.Module:
        return dense_rope_layer(spec, layer_idx, rotary, ctx)
