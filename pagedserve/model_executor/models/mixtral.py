"""Mixtral (MixtralForCausalLM): Mistral attention (no biases, one sliding window or none) with
a sparse MoE block of num_local_experts experts in every layer; softmax router, top-k
renormalized (always); checkpoint names block_sparse_moe.gate and block_sparse_moe.experts.E.
{w1 (gate), w3 (up), w2 (down)} (the "mixtral" adapter of model_spec.py renames them)."""

from __future__ import annotations

from pagedserve.model_executor.models.moe_base import MoEDecoderForCausalLM

__all__ = ["MixtralForCausalLM"]


class MixtralForCausalLM(MoEDecoderForCausalLM):
    pass
