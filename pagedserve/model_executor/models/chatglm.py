"""ChatGLM2 / ChatGLM3 / GLM-4 chat checkpoints in their published `ChatGLMModel` layout
(model_type "chatglm", remote code `modeling_chatglm.py`; we run none of it).

The math is the dense rotary block: RMSNorm, fused query_key_value [q | k | v] with bias and
multi_query_group_num KV heads, rotary on interleaved pairs over the first half of each head
(spec.rope: partial 0.5, is_neox False, base 10000 * rope_ratio), fused dense_h_to_4h
[gate | up] with swiglu, dense_4h_to_h. The "chatglm" adapter of model_spec.py maps the config and
the tensor names onto ours (checkpoint_names):

    transformer.embedding.word_embeddings           -> model.embed_tokens
    transformer.encoder.layers.N.self_attention.query_key_value -> ...self_attn.qkv_proj (whole)
    transformer.encoder.layers.N.self_attention.dense           -> ...self_attn.o_proj
    transformer.encoder.layers.N.mlp.dense_h_to_4h / dense_4h_to_h -> ...mlp.gate_up_proj / down_proj
    transformer.encoder.final_layernorm / transformer.output_layer -> model.norm / lm_head
"""

from __future__ import annotations

from torch import nn

from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import dense_rope_layer
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec
from pagedserve.model_executor.models.base import DecoderForCausalLM

__all__ = ["ChatGLMForCausalLM"]


class ChatGLMForCausalLM(DecoderForCausalLM):
    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                   ctx: BuildContext) -> nn.Module:
        return dense_rope_layer(spec, layer_idx, rotary, ctx)
