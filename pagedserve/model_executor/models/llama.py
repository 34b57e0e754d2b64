"""Llama-family decoder (Llama 2/3/3.1, DeepSeek-LLM; Mistral and Qwen2/3 subclass it).

One implementation driven by the `ModelSpec` (model_spec.py; this module reads no Hugging Face
config names): q/k/v/o and MLP biases, per-head q/k RMSNorm (Qwen3), per-layer sliding windows.
Every parameter is named as in the Hugging Face Llama checkpoint except the merged projections
(the spec's `checkpoint_names` maps other layouts onto these names):

    model.layers.N.self_attn.{q,k,v}_proj.*   ->  model.layers.N.self_attn.qkv_proj.*  (shards q/k/v)
    model.layers.N.mlp.{gate,up}_proj.*       ->  model.layers.N.mlp.gate_up_proj.*    (shards 0/1)

Batch layout: all tokens of all requests packed into one [T] sequence; `positions` gives each
token's absolute position and `AttentionMetadata` says which request it belongs to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from pagedserve.model_executor.layers.activation import SiluAndMul, get_gated_activation
from pagedserve.model_executor.layers.attention import Attention, AttentionMetadata
from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.embedding import LMHead, VocabEmbedding, default_weight_loader
from pagedserve.model_executor.layers.linear import (
    Linear,
    LinearMethod,
    MergedLinear,
    QKVLinear,
    UnquantizedLinearMethod,
)
from pagedserve.model_executor.layers.norm import RMSNorm
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec, layer_sliding_windows

__all__ = ["LlamaForCausalLM", "layer_sliding_windows"]

KVCache = tuple[Tensor, Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                 linear_method: LinearMethod | None, *, ctx: BuildContext) -> None:
        super().__init__()
        hidden = spec.hidden_size
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.qkv_proj = QKVLinear(hidden, self.head_dim, self.num_heads, self.num_kv_heads,
                                  bias=spec.qkv_bias, linear_method=linear_method,
                                  ctx=ctx.child("qkv_proj"))
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=spec.o_bias,
                             linear_method=linear_method, ctx=ctx.child("o_proj"))
        self.q_norm = RMSNorm(self.head_dim, spec.norm_eps, ctx=ctx.child("q_norm")) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, spec.norm_eps, ctx=ctx.child("k_norm")) if spec.qk_norm else None
        self.rotary_emb = rotary  # shared by all layers (one cos/sin cache)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              scale=self.head_dim**-0.5, ctx=ctx.child("attn"),
                              sliding_window=spec.sliding_windows[layer_idx])

    def forward(self, positions: Tensor, hidden: Tensor, kv_cache: KVCache | None,
                attn_metadata: AttentionMetadata) -> Tensor:
        return self.forward_qkv(positions, self.qkv_proj(hidden), kv_cache, attn_metadata)

    def forward_qkv(self, positions: Tensor, qkv: Tensor, kv_cache: KVCache | None,
                    attn_metadata: AttentionMetadata) -> Tensor:
        """The block after the QKV projection: qkv [T, (H + 2*KVH)*d] -> [T, hidden]."""
        q, k, v = self.qkv_proj.split(qkv)  # [T, H*d], [T, KVH*d] x2
        if self.q_norm is not None and self.k_norm is not None:
            t = q.shape[0]
            q = cast(Tensor, self.q_norm(q.reshape(t, self.num_heads, self.head_dim))).reshape(t, -1)
            k = cast(Tensor, self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))).reshape(t, -1)
        # Rotary + KV write + attention; one fused rotary/KV-write launch when the backend has it
        # (q/k norms above come first either way, as in Qwen3).
        out = self.attn.forward_rotary(positions, q, k, v, self.rotary_emb, kv_cache, attn_metadata)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec, linear_method: LinearMethod | None, *,
                 ctx: BuildContext) -> None:
        super().__init__()
        inter, bias = spec.intermediate_size, spec.mlp_bias
        self.gate_up_proj = MergedLinear(spec.hidden_size, [inter, inter], bias=bias,
                                         linear_method=linear_method, ctx=ctx.child("gate_up_proj"))
        self.act_fn = get_gated_activation(spec.hidden_act, ctx=ctx.child("act_fn"))
        self.down_proj = Linear(inter, spec.hidden_size, bias=bias, linear_method=linear_method,
                                ctx=ctx.child("down_proj"))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                 linear_method: LinearMethod | None, *, ctx: BuildContext) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(spec, layer_idx, rotary, linear_method, ctx=ctx.child("self_attn"))
        self.mlp = LlamaMLP(spec, linear_method, ctx=ctx.child("mlp"))
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps, ctx=ctx.child("input_layernorm"))
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps,
                                                ctx=ctx.child("post_attention_layernorm"))
        # Small batches (decode) fold each RMSNorm into the projection after it and the
        # SiLU-and-mul into gate_up (3 kernels per layer fewer), up to the kernel set's limits.
        # Only for plain weights.
        kernels = ctx.kernels
        plain = all(isinstance(p.linear_method, UnquantizedLinearMethod)
                    for p in (self.self_attn.qkv_proj, self.mlp.gate_up_proj))
        silu = isinstance(self.mlp.act_fn, SiluAndMul)
        self.fused_gemv = kernels.fused_gemv if plain and silu else None
        self.norm_gemv_max_tokens = kernels.gemv_limits.norm
        self.gated_gemv_max_tokens = kernels.gemv_limits.gated

    def forward(self, positions: Tensor, hidden: Tensor, residual: Tensor | None,
                kv_cache: KVCache | None, attn_metadata: AttentionMetadata) -> tuple[Tensor, Tensor]:
        """Pre-norm block. The residual add is fused into the following norm:
        returns (mlp output, residual stream before it); the caller adds them in the next norm."""
        if self.fused_gemv is not None and hidden.shape[0] <= self.norm_gemv_max_tokens:
            return self._forward_small_batch(positions, hidden, residual, kv_cache, attn_metadata)
        if residual is None:
            residual = hidden
            hidden = cast(Tensor, self.input_layernorm(hidden))
        else:
            hidden, residual = cast(tuple[Tensor, Tensor], self.input_layernorm(hidden, residual))
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = cast(tuple[Tensor, Tensor], self.post_attention_layernorm(hidden, residual))
        return self.mlp(hidden), residual

    def _forward_small_batch(self, positions: Tensor, hidden: Tensor, residual: Tensor | None,
                             kv_cache: KVCache | None, attn_metadata: AttentionMetadata
                             ) -> tuple[Tensor, Tensor]:
        """forward() for at most norm_gemv_max_tokens tokens, same result: norm + qkv, attention
        + o_proj, norm + gate_up (+ SiLU-and-mul up to gated_gemv_max_tokens), down_proj."""
        gemv = self.fused_gemv
        assert gemv is not None
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv, residual = gemv(hidden, attn.qkv_proj.weight, bias=attn.qkv_proj.bias,
                             norm_weight=norm1.weight, residual=residual, eps=norm1.eps)
        hidden = attn.forward_qkv(positions, qkv, kv_cache, attn_metadata)
        gated = hidden.shape[0] <= self.gated_gemv_max_tokens
        act, residual = gemv(hidden, mlp.gate_up_proj.weight, bias=mlp.gate_up_proj.bias,
                             norm_weight=norm2.weight, residual=residual, eps=norm2.eps, gated=gated)
        if not gated:
            act = mlp.act_fn(act)
        return mlp.down_proj(act), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, linear_method: LinearMethod | None, *,
                 ctx: BuildContext) -> None:
        super().__init__()
        if spec.rope is None or not spec.rms_norm or spec.num_experts:
            raise ValueError(f"the Llama decoder needs rotary embedding, RMSNorm and a dense MLP; "
                             f"model_type {spec.model_type!r} has alibi={spec.alibi}, "
                             f"rms_norm={spec.rms_norm}, num_experts={spec.num_experts}")
        self.embed_tokens = VocabEmbedding(spec.vocab_size, spec.hidden_size, ctx=ctx.child("embed_tokens"))
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position, spec.rope, ctx=ctx.child("rotary_emb"))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(spec, i, rotary, linear_method, ctx=ctx.child(f"layers.{i}"))
            for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps, ctx=ctx.child("norm"))

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[KVCache],
                attn_metadata: AttentionMetadata) -> Tensor:
        hidden = self.embed_tokens(input_ids)
        residual: Tensor | None = None
        for i, layer in enumerate(self.layers):
            kv_cache = kv_caches[i] if kv_caches else None  # [] = profiling run, no cache
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = cast(tuple[Tensor, Tensor], self.norm(hidden, residual))
        return hidden


class LlamaForCausalLM(nn.Module):
    """Causal LM with a paged KV cache. Parameters are created uninitialised on the current
    default device/dtype (the loader sets both) and filled by `load_weights`.

    `config` is the transformers config, kept as `self.config` for callers that inspect it (as a
    transformers model has it); everything is built from `spec` (default: derived from `config`;
    the loader passes the engine's one spec). `ctx` carries the kernel set, chosen once by the
    loader, down to every layer (module names as prefixes: "model.layers.0.mlp.gate_up_proj")."""

    def __init__(self, config: Any, *, ctx: BuildContext,
                 linear_method: LinearMethod | None = None, spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.config = config
        self.spec = spec if spec is not None else ModelSpec.from_hf(config)
        self.model = LlamaModel(self.spec, linear_method, ctx=ctx.child("model"))
        tie = self.spec.tie_word_embeddings
        self.lm_head = LMHead(self.spec.vocab_size, self.spec.hidden_size,
                              tie_to=self.model.embed_tokens if tie else None, ctx=ctx.child("lm_head"))

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[KVCache],
                attn_metadata: AttentionMetadata) -> Tensor:
        """input_ids, positions [T] int64 -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        return self.lm_head(hidden)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into the parameters; returns the names of our
        parameters that were fully loaded (a merged one only once all its shards arrived).
        Names are mapped by the spec's `checkpoint_names`. Unknown names raise ValueError; the
        `ignored` ones (`rotary_emb.inv_freq`, ...) and a tied lm_head are skipped."""
        names = self.spec.checkpoint_names
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards_seen: dict[str, set[str | int]] = {}
        for ckpt_name, tensor in weights:
            if any(piece in ckpt_name for piece in names.ignored):
                continue
            name = names.rename(ckpt_name)
            if self.lm_head.tied and name.startswith("lm_head."):
                continue
            for fused, ckpt, shard_id in names.stacked:
                if ckpt in name:
                    target = name.replace(ckpt, fused)
                    param = self._param(params, target, ckpt_name)
                    param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]
                    seen = shards_seen.setdefault(target, set())
                    seen.add(shard_id)
                    if len(seen) == names.num_shards(fused):
                        loaded.add(target)
                    break
            else:
                param = self._param(params, name, ckpt_name)
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, tensor)
                loaded.add(name)
        return loaded

    @staticmethod
    def _param(params: dict[str, nn.Parameter], target: str, ckpt_name: str) -> nn.Parameter:
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no model parameter "
                             f"(looked for {target!r})")
        return param
