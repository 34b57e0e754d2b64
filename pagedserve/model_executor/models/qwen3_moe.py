"""Qwen3-MoE (Qwen3MoeForCausalLM, Qwen3-30B-A3B / 235B-A22B): Qwen3 attention (per-head q/k
RMSNorm, biases per attention_bias) with a sparse MoE block and no shared expert; top-k
renormalized when norm_topk_prob (true in the published configs); mlp_only_layers /
decoder_sparse_step as Qwen2-MoE."""

from __future__ import annotations

from pagedserve.model_executor.models.moe_base import MoEDecoderForCausalLM

__all__ = ["Qwen3MoeForCausalLM"]


class Qwen3MoeForCausalLM(MoEDecoderForCausalLM):
    pass
