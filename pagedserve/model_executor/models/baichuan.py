"""Baichuan and Baichuan2 (`BaichuanForCausalLM`, model_type "baichuan"), as published.

The Llama layout except two things: q|k|v are one fused `self_attn.W_pack` tensor (rows q, k, v;
the "baichuan" adapter renames it onto qkv_proj, which splits it at load), and Baichuan2's LM
head is a `NormHead` (logits = x @ normalize(W)^T, each vocab row L2-normalized at inference).
The 7B models use rotary attention (the Llama layer); the 13B models use ALiBi: no rotary, and
head h's score for query position i and key j gets slope_h * (j - i), the slopes of
`kernels.reference.alibi_slopes` (Baichuan's `_get_interleave`). Which one a checkpoint has,
and whether it has a NormHead, is read from config.json by model_spec.py's adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagedserve.kernels.reference import alibi_slopes
from pagedserve.model_executor.layers.attention import Attention, AttentionMetadata
from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import (
    DecoderLayer,
    GatedMLP,
    KVCache,
    dense_rope_layer,
)
from pagedserve.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec
from pagedserve.model_executor.models.base import DecoderForCausalLM

__all__ = ["AlibiAttention", "BaichuanForCausalLM", "baichuan_tokenizer"]


class AlibiAttention(nn.Module):
    """norm + qkv_proj, KV write + paged attention with ALiBi biases over this rank's heads,
    o_proj (the RopeAttention block without rotary). Tensor parallel: rank r holds heads
    [r * H_r, (r + 1) * H_r) and their slopes."""

    def __init__(self, spec: ModelSpec, layer_idx: int, *, ctx: BuildContext) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, bias=spec.qkv_bias,
                                          ctx=ctx.child("qkv_proj"))
        heads = self.qkv_proj.num_heads  # this rank's
        first = self.qkv_proj.tp_rank * heads
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size,
                                        bias=spec.o_bias, ctx=ctx.child("o_proj"))
        self.attn = Attention(heads, spec.head_dim, self.qkv_proj.num_kv_heads,
                              scale=spec.head_dim**-0.5, ctx=ctx.child("attn"),
                              sliding_window=spec.sliding_windows[layer_idx],
                              alibi_slopes=alibi_slopes(spec.num_heads)[first:first + heads])

    def forward(self, positions: Tensor, hidden: Tensor, residual: Tensor | None, norm: nn.Module,
                kv_cache: KVCache | None, attn_metadata: AttentionMetadata) -> tuple[Tensor, Tensor]:
        qkv, residual = self.qkv_proj.norm_forward(hidden, residual, norm)
        q, k, v = self.qkv_proj.split(qkv)  # [T, H*d], [T, KVH*d] x2
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata)), residual


class BaichuanForCausalLM(DecoderForCausalLM):
    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        """Rotary (7B) or ALiBi (13B); RMSNorm and a dense MLP either way."""
        if not spec.rms_norm or spec.num_experts or (spec.rope is None and not spec.alibi):
            raise ValueError(f"{cls.__name__} needs rotary embedding or ALiBi, RMSNorm and a dense "
                             f"MLP; got alibi={spec.alibi}, rms_norm={spec.rms_norm}, "
                             f"num_experts={spec.num_experts}")

    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding | None,
                   ctx: BuildContext) -> nn.Module:
        if rotary is not None:
            return dense_rope_layer(spec, layer_idx, rotary, ctx)
        attn = AlibiAttention(spec, layer_idx, ctx=ctx.child("self_attn"))
        mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, spec.hidden_act,
                       ctx=ctx.child("mlp"))
        return DecoderLayer(attn, mlp, spec.hidden_size, spec.norm_eps, ctx=ctx)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """As DecoderForCausalLM's; a NormHead's `lm_head.weight` [vocab, hidden] is normalized
        row by row (in float32) once here, which is what NormHead does at every inference
        forward. Rows are whole on every rank (the head is split by vocab), so this commutes
        with the tensor-parallel slicing."""
        if not self.spec.norm_head:
            return super().load_weights(weights)
        return super().load_weights(_normalized_head(weights))


def _normalized_head(weights: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    for name, tensor in weights:
        if name == "lm_head.weight":
            tensor = F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
        yield name, tensor


# Baichuan2-Chat's format (its generation_utils.build_chat_input): the system text as is, then
# each user message after the user token, each assistant message after the assistant token (no
# end-of-turn token), and the assistant token to prompt a reply. The role tokens are the pieces
# of generation_config.json's user_token_id / assistant_token_id (195 / 196: <reserved_106>,
# <reserved_107>).
_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '" "USER" "' }}{{ m['content'] }}"
    "{% else %}{{ '" "ASSISTANT" "' }}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{ '" "ASSISTANT" "' }}{% endif %}"
)


def baichuan_tokenizer(tokenizer_dir: str) -> Any:
    """Baichuan's tokenizer from tokenizer.model (sentencepiece, no remote code); with the chat
    format above when generation_config.json names the role tokens and tokenizer_config.json
    has no chat_template (Baichuan-7B/13B-Base have neither: plain text only)."""
    from pagedserve.tokenizers.sentencepiece_tok import load_sentencepiece_tokenizer

    gen = os.path.join(tokenizer_dir, "generation_config.json")
    roles: dict[str, Any] = {}
    if os.path.isfile(gen):
        with open(gen, encoding="utf-8") as f:
            roles = json.load(f)
    user, assistant = roles.get("user_token_id"), roles.get("assistant_token_id")
    if not isinstance(user, int) or not isinstance(assistant, int):
        return load_sentencepiece_tokenizer(tokenizer_dir)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    user_piece, assistant_piece = sp.id_to_piece(user), sp.id_to_piece(assistant)
    template = _CHAT_TEMPLATE.replace("USER", user_piece).replace("ASSISTANT", assistant_piece)
    return load_sentencepiece_tokenizer(tokenizer_dir, chat_template=template,
                                        extra_special_tokens=[user_piece, assistant_piece])
