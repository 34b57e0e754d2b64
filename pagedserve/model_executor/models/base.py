"""The causal-LM skeleton every decoder family shares: embedding, N decoder layers (built by the
family's `make_layer`), final norm, LM head, and ONE generic `load_weights`.

Parameter names follow the Hugging Face Llama layout (model.embed_tokens, model.layers.N.*,
model.norm, lm_head) except the merged projections, which `packed_modules_mapping` (class level)
lists with their checkpoint parts; the spec's `checkpoint_names` maps a family's checkpoint names
onto ours and says which checkpoint tensor is which shard of a merged parameter:

    model.layers.N.self_attn.{q,k,v}_proj.*   ->  model.layers.N.self_attn.qkv_proj.*  (shards q/k/v)
    model.layers.N.mlp.{gate,up}_proj.*       ->  model.layers.N.mlp.gate_up_proj.*    (shards 0/1)

Batch layout: all tokens of all requests packed into one [T] sequence; `positions` gives each
token's absolute position and `AttentionMetadata` says which request it belongs to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from pagedserve.model_executor.layers.attention import AttentionMetadata
from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import KVCache
from pagedserve.model_executor.layers.embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
    default_weight_loader,
)
from pagedserve.model_executor.layers.norm import RMSNorm
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec

__all__ = ["DecoderForCausalLM", "DecoderModel", "LLAMA_PACKED_MODULES", "MakeLayer"]

# spec, layer index, the shared rotary embedding (None for an ALiBi spec), the layer's context
# -> a DecoderLayer
MakeLayer = Callable[[ModelSpec, int, Any, BuildContext], nn.Module]

LLAMA_PACKED_MODULES: dict[str, list[str]] = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, make_layer: MakeLayer, *, ctx: BuildContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size,
                                                   ctx=ctx.child("embed_tokens"))
        rotary = (None if spec.rope is None else  # ALiBi (a family whose check_spec allows it)
                  RotaryEmbedding(spec.head_dim, spec.max_position, spec.rope, ctx=ctx.child("rotary_emb")))
        self.layers = nn.ModuleList(make_layer(spec, i, rotary, ctx.child(f"layers.{i}"))
                                    for i in range(spec.num_layers))
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


class DecoderForCausalLM(nn.Module):
    """Causal LM with a paged KV cache. Parameters are created uninitialised on the current
    default device/dtype (the loader sets both) and filled by `load_weights`.

    `config` is the transformers config, kept as `self.config` for callers that inspect it (as a
    transformers model has it); everything is built from `spec` (default: derived from `config`;
    the loader passes the engine's one spec). `ctx` carries the kernel set, the quantization
    config and the parallel group down to every layer (module names as prefixes:
    "model.layers.0.mlp.gate_up_proj"). A family subclass gives `make_layer`."""

    packed_modules_mapping: ClassVar[dict[str, list[str]]] = LLAMA_PACKED_MODULES

    def __init__(self, config: Any, *, ctx: BuildContext, spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.config = config
        self.spec = spec if spec is not None else ModelSpec.from_hf(config)
        self.check_spec(self.spec)
        self._quantized = ctx.quant_config is not None
        self.model = DecoderModel(self.spec, self.make_layer, ctx=ctx.child("model"))
        tie = self.spec.tie_word_embeddings
        self.lm_head = ParallelLMHead(self.spec.vocab_size, self.spec.hidden_size,
                                      tie_to=self.model.embed_tokens if tie else None,
                                      ctx=ctx.child("lm_head"))

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        """Refuse a spec these blocks cannot run (the dense rotary decoder by default)."""
        if spec.rope is None or not spec.rms_norm or spec.num_experts:
            raise ValueError(f"the {cls.__name__} decoder needs rotary embedding, RMSNorm and a dense "
                             f"MLP; model_type {spec.model_type!r} has alibi={spec.alibi}, "
                             f"rms_norm={spec.rms_norm}, num_experts={spec.num_experts}")

    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                   ctx: BuildContext) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define make_layer")

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[KVCache],
                attn_metadata: AttentionMetadata) -> Tensor:
        """input_ids, positions [T] int64 -> hidden states [T, hidden]."""
        return cast(Tensor, self.model(input_ids, positions, kv_caches, attn_metadata))

    def compute_logits(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32 (written into `out` when given)."""
        return cast(Tensor, self.lm_head(hidden, out=out))

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into the parameters (each rank its slice, through
        the parameters' weight_loader); returns the names of our parameters that were fully
        loaded (a merged one only once all its shards arrived). Names are mapped by the spec's
        `checkpoint_names`. Unknown names raise ValueError; the `ignored` ones
        (`rotary_emb.inv_freq`, ...) and a tied lm_head are skipped."""
        names = self.spec.checkpoint_names
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards_seen: dict[str, set[str | int]] = {}
        tied = cast(ParallelLMHead, self.lm_head).tied
        for ckpt_name, tensor in weights:
            if any(piece in ckpt_name for piece in names.ignored):
                continue
            name = names.rename(ckpt_name)
            if tied and name.startswith("lm_head."):
                continue
            if self._quantized and name.endswith(".bias") and self._extra_bias(name, tensor, params):
                continue
            for fused, ckpt, shard_id in names.stacked:
                if ckpt in name:
                    target = name.replace(ckpt, fused)
                    param = _param(params, target, ckpt_name)
                    param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]
                    seen = shards_seen.setdefault(target, set())
                    seen.add(shard_id)
                    if len(seen) == names.num_shards(fused):
                        loaded.add(target)
                    break
            else:
                param = _param(params, name, ckpt_name)
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, tensor)
                loaded.add(name)
        return loaded

    def _extra_bias(self, name: str, tensor: Tensor, params: dict[str, nn.Parameter]) -> bool:
        """An all-zero bias of a layer that has none: GPTQ checkpoints of GPTQ-for-LLaMa's
        time store one for every linear layer (vLLM skips them too); a nonzero one still fails."""
        target = next((name.replace(ckpt, fused) for fused, ckpt, _ in self.spec.checkpoint_names.stacked
                       if ckpt in name), name)
        return target not in params and not bool(tensor.any())


def _param(params: dict[str, nn.Parameter], target: str, ckpt_name: str) -> nn.Parameter:
    param = params.get(target)
    if param is None:
        raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no model parameter "
                         f"(looked for {target!r})")
    return param
