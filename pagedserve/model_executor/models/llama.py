"""Llama-family decoder (Llama 2/3/3.1, DeepSeek-LLM; Mistral and Qwen2/3 subclass it).

One implementation driven by config flags (`DecoderFlags`): q/k/v/o and MLP biases, per-head
q/k RMSNorm (Qwen3), per-layer sliding windows. Every parameter is named as in the Hugging Face
checkpoint except the merged projections:

    model.layers.N.self_attn.{q,k,v}_proj.*   ->  model.layers.N.self_attn.qkv_proj.*  (shards q/k/v)
    model.layers.N.mlp.{gate,up}_proj.*       ->  model.layers.N.mlp.gate_up_proj.*    (shards 0/1)

Batch layout: all tokens of all requests packed into one [T] sequence; `positions` gives each
token's absolute position and `AttentionMetadata` says which request it belongs to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from pagedserve.kernels.registry import active_kernels
from pagedserve.model_executor.layers.activation import SiluAndMul, get_gated_activation
from pagedserve.model_executor.layers.attention import (
    Attention,
    AttentionBackend,
    AttentionMetadata,
    get_attention_backend,
)
from pagedserve.model_executor.layers.embedding import LMHead, VocabEmbedding, default_weight_loader
from pagedserve.model_executor.layers.linear import (
    Linear,
    LinearMethod,
    MergedLinear,
    QKVLinear,
    UnquantizedLinearMethod,
)
from pagedserve.model_executor.layers.norm import RMSNorm
from pagedserve.model_executor.layers.rotary import RotaryEmbedding, get_rope_config

__all__ = ["DecoderFlags", "LlamaForCausalLM", "layer_sliding_windows"]

KVCache = tuple[Tensor, Tensor]


@dataclass(slots=True)
class DecoderFlags:
    """Per-architecture switches, derived once from the HF config."""

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over head_dim on q and k before rotary (Qwen3)
    sliding_windows: list[int | None]  # one entry per layer


def layer_sliding_windows(config: Any) -> list[int | None]:
    """Qwen2/Qwen3 semantics, as transformers applies them: `layer_types[i] ==
    "sliding_attention"` gets `sliding_window`; without layer_types, layers i >=
    max_window_layers slide when use_sliding_window is set."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if not getattr(config, "use_sliding_window", False) or window is None:
            return [None] * n
        first = getattr(config, "max_window_layers", 0)
        return [window if i >= first else None for i in range(n)]
    if len(layer_types) != n:
        raise ValueError(f"layer_types has {len(layer_types)} entries, expected num_hidden_layers={n}")
    if not getattr(config, "use_sliding_window", True):
        window = None
    return [window if t == "sliding_attention" else None for t in layer_types]


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, flags: DecoderFlags, layer_idx: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend, linear_method: LinearMethod | None) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.qkv_proj = QKVLinear(hidden, self.head_dim, self.num_heads, self.num_kv_heads,
                                  bias=flags.qkv_bias, linear_method=linear_method)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=flags.o_bias,
                             linear_method=linear_method)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if flags.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if flags.qk_norm else None
        self.rotary_emb = rotary  # shared by all layers (one cos/sin cache)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              scale=self.head_dim**-0.5, backend=backend,
                              sliding_window=flags.sliding_windows[layer_idx])

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
    def __init__(self, config: Any, bias: bool, linear_method: LinearMethod | None) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [inter, inter], bias=bias,
                                         linear_method=linear_method)
        self.act_fn = get_gated_activation(getattr(config, "hidden_act", "silu"))
        self.down_proj = Linear(inter, config.hidden_size, bias=bias, linear_method=linear_method)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, flags: DecoderFlags, layer_idx: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend, linear_method: LinearMethod | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, flags, layer_idx, rotary, backend, linear_method)
        self.mlp = LlamaMLP(config, flags.mlp_bias, linear_method)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Small batches (decode) fold each RMSNorm into the projection after it and the
        # SiLU-and-mul into gate_up (3 kernels per layer fewer), up to the kernel set's limits.
        # Only for plain weights.
        kernels = active_kernels()
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
    def __init__(self, config: Any, flags: DecoderFlags, backend: AttentionBackend,
                 linear_method: LinearMethod | None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(head_dim, config.max_position_embeddings, get_rope_config(config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, flags, i, rotary, backend, linear_method)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[KVCache],
                attn_metadata: AttentionMetadata) -> Tensor:
        hidden = self.embed_tokens(input_ids)
        residual: Tensor | None = None
        for i, layer in enumerate(self.layers):
            kv_cache = kv_caches[i] if kv_caches else None  # [] = profiling run, no cache
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = cast(tuple[Tensor, Tensor], self.norm(hidden, residual))
        return hidden


# (fused parameter, checkpoint name, shard id)
_STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)
_NUM_SHARDS = {".qkv_proj.": 3, ".gate_up_proj.": 2}


class LlamaForCausalLM(nn.Module):
    """Causal LM with a paged KV cache. Parameters are created uninitialised on the current
    default device/dtype (the loader sets both) and filled by `load_weights`."""

    def __init__(self, config: Any, attn_backend: str = "torch",
                 linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        self.config = config
        self.flags = self.decoder_flags(config)
        backend = get_attention_backend(attn_backend)  # chosen once, here
        self.model = LlamaModel(config, self.flags, backend, linear_method)
        tie = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size,
                              tie_to=self.model.embed_tokens if tie else None)

    @classmethod
    def decoder_flags(cls, config: Any) -> DecoderFlags:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return DecoderFlags(qkv_bias=attention_bias, o_bias=attention_bias,
                            mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=False,
                            sliding_windows=[None] * config.num_hidden_layers)

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
        Unknown names raise ValueError; `rotary_emb.inv_freq` and a tied lm_head are skipped."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards_seen: dict[str, set[str | int]] = {}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name \
                    or "rotary_emb.sin_cached" in name:
                continue
            if self.lm_head.tied and name.startswith("lm_head."):
                continue
            for fused, ckpt, shard_id in _STACKED_PARAMS:
                if ckpt in name:
                    target = name.replace(ckpt, fused)
                    param = self._param(params, target, name)
                    param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]
                    seen = shards_seen.setdefault(target, set())
                    seen.add(shard_id)
                    if len(seen) == _NUM_SHARDS[fused]:
                        loaded.add(target)
                    break
            else:
                param = self._param(params, name, name)
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
