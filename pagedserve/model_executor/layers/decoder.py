"""Shared pre-norm decoder blocks: RopeAttention, GatedMLP and DecoderLayer(attn, mlp).

A block takes the un-normed hidden states, the residual stream and the norm in front of it, and
returns (output, residual stream): the projection after the norm decides, through its
LinearMethod, whether the norm (and the SiLU-and-mul after gate_up) is folded into its GEMV for
small batches or runs separately. Any block with these signatures drops into DecoderLayer (an MoE
block in place of GatedMLP runs the norm itself):

    attn(positions, hidden, residual, norm, kv_cache, attn_metadata) -> (out, residual)
    mlp(hidden, residual, norm)                                      -> (out, residual)

    DecoderLayer: h, r = attn(pos, h, r, input_layernorm, ...); return mlp(h, r, post_attention_layernorm)

Tensor parallel: qkv_proj / gate_up_proj are column parallel (this rank's heads / intermediate
slice), o_proj / down_proj row parallel (all-reduced), so every block output is whole again.
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from pagedserve.model_executor.layers.activation import SiluAndMul, get_gated_activation
from pagedserve.model_executor.layers.attention import Attention, AttentionMetadata
from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedserve.model_executor.layers.norm import RMSNorm
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec

__all__ = ["DecoderLayer", "GatedMLP", "KVCache", "RopeAttention", "dense_rope_layer"]

KVCache = tuple[Tensor, Tensor]


class RopeAttention(nn.Module):
    """norm + qkv_proj, optional per-head q/k RMSNorm (Qwen3), rotary + KV write + paged
    attention over this rank's heads, o_proj."""

    def __init__(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding, *,
                 ctx: BuildContext, qk_norm: bool = False) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, bias=spec.qkv_bias,
                                          ctx=ctx.child("qkv_proj"))
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size,
                                        bias=spec.o_bias, ctx=ctx.child("o_proj"))
        self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps, ctx=ctx.child("q_norm")) if qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps, ctx=ctx.child("k_norm")) if qk_norm else None
        self.rotary_emb = rotary  # shared by all layers (one cos/sin cache)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              scale=self.head_dim**-0.5, ctx=ctx.child("attn"),
                              sliding_window=spec.sliding_windows[layer_idx])

    def forward(self, positions: Tensor, hidden: Tensor, residual: Tensor | None, norm: nn.Module,
                kv_cache: KVCache | None, attn_metadata: AttentionMetadata) -> tuple[Tensor, Tensor]:
        qkv, residual = self.qkv_proj.norm_forward(hidden, residual, norm)
        q, k, v = self.qkv_proj.split(qkv)  # [T, H*d], [T, KVH*d] x2
        if self.q_norm is not None and self.k_norm is not None:
            t = q.shape[0]
            q = cast(Tensor, self.q_norm(q.reshape(t, self.num_heads, self.head_dim))).reshape(t, -1)
            k = cast(Tensor, self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))).reshape(t, -1)
        # Rotary + KV write + attention; one fused rotary/KV-write launch when the backend has it
        # (q/k norms above come first either way, as in Qwen3).
        out = self.attn.forward_rotary(positions, q, k, v, self.rotary_emb, kv_cache, attn_metadata)
        return self.o_proj(out), residual


class GatedMLP(nn.Module):
    """norm + gate_up_proj [gate | up], act(gate) * up, down_proj. For small batches the method
    may fold the norm and (for SiLU) the activation into gate_up's GEMV."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, hidden_act: str, *,
                 ctx: BuildContext) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2,
                                                       bias=bias, ctx=ctx.child("gate_up_proj"))
        self.act_fn = get_gated_activation(hidden_act, ctx=ctx.child("act_fn"))
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias,
                                           ctx=ctx.child("down_proj"))
        method = self.gate_up_proj.linear_method
        self._gate_up_apply = method.apply  # bound once
        # the fused activation is SiLU-and-mul: other activations run on their own
        self._gated_max_tokens = (method.fused_max_tokens(gated=True)
                                  if isinstance(self.act_fn, SiluAndMul) else 0)

    def forward(self, hidden: Tensor, residual: Tensor | None,
                norm: nn.Module) -> tuple[Tensor, Tensor]:
        if hidden.shape[0] <= self._gated_max_tokens:
            act, residual = self._gate_up_apply(self.gate_up_proj, hidden, norm=norm,
                                                residual=residual, gated=True)
        else:
            gate_up, residual = self.gate_up_proj.norm_forward(hidden, residual, norm)
            act = self.act_fn(gate_up)
        return self.down_proj(act), residual


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual add is fused into the following norm: returns (mlp output,
    residual stream before it); the caller adds them in the next norm."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float, *,
                 ctx: BuildContext) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps, ctx=ctx.child("input_layernorm"))
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, ctx=ctx.child("post_attention_layernorm"))

    def forward(self, positions: Tensor, hidden: Tensor, residual: Tensor | None,
                kv_cache: KVCache | None, attn_metadata: AttentionMetadata) -> tuple[Tensor, Tensor]:
        hidden, residual = self.self_attn(positions, hidden, residual, self.input_layernorm,
                                          kv_cache, attn_metadata)
        return cast(tuple[Tensor, Tensor], self.mlp(hidden, residual, self.post_attention_layernorm))


def dense_rope_layer(spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding, ctx: BuildContext, *,
                     qk_norm: bool = False) -> DecoderLayer:
    """The Llama-shaped layer (rotary attention, gated MLP, RMSNorms) every dense family builds;
    `qk_norm`: per-head RMSNorm on q and k before rotary (Qwen3)."""
    attn = RopeAttention(spec, layer_idx, rotary, ctx=ctx.child("self_attn"), qk_norm=qk_norm)
    mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, spec.hidden_act,
                   ctx=ctx.child("mlp"))
    return DecoderLayer(attn, mlp, spec.hidden_size, spec.norm_eps, ctx=ctx)
