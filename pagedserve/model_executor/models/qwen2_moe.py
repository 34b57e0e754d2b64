"""Qwen2-MoE (Qwen2MoeForCausalLM, Qwen1.5-MoE / Qwen2-57B-A14B): Qwen2 attention (q/k/v biases)
with a sparse MoE block of moe_intermediate_size experts plus one shared expert
(shared_expert_intermediate_size) scaled by sigmoid(shared_expert_gate(h)); top-k renormalized
only when norm_topk_prob; layers in mlp_only_layers (or off decoder_sparse_step) keep a dense MLP."""

from __future__ import annotations

from pagedserve.model_executor.models.moe_base import MoEDecoderForCausalLM

__all__ = ["Qwen2MoeForCausalLM"]


class Qwen2MoeForCausalLM(MoEDecoderForCausalLM):
    pass
