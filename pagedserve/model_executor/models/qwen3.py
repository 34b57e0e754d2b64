"""Qwen3: per-head RMSNorm (`q_norm`, `k_norm` over head_dim) on q and k before rotary; explicit
head_dim; q/k/v/o biases follow `attention_bias` (off by default); Qwen2 sliding-window rules.
The differences live in the "qwen3" adapter of model_spec.py (`qk_norm` and the biases)."""

from __future__ import annotations

from pagedserve.model_executor.models.llama import LlamaForCausalLM

__all__ = ["Qwen3ForCausalLM"]


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
