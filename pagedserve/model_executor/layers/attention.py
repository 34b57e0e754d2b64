"""Paged attention layer.

The backend (`pagedserve.kernels.attention_backend.AttentionBackend`: KV write, attend, optional
fused rotary + KV write) comes from the layer's `BuildContext`, chosen once at start-up with the
kernel set (kernels/registry.py). Nothing in the forward pass looks a backend up again.

Packed batch layout (B = 3 requests, T = 7 new tokens):

    tokens            [ a0 a1 a2 | b0 | c0 c1 c2 ]
    query_start_loc   [ 0,        3,   4,        7 ]
    seq_lens          [ 3,        9,   5 ]        context after this step (b: 8 cached + 1 new)
    slot_mapping[t]   block_tables[req, pos // block_size] * block_size + pos % block_size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagedserve.kernels.attention_backend import AttentionBackend
from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.rotary import RotaryEmbedding

__all__ = [
    "AttentionMetadata",
    "AttentionBackend",
    "Attention",
    "dense_causal_attention",
]


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step batch description shared by every attention layer of the model."""

    slot_mapping: Tensor  # [T] int64, -1 = padding token (K/V not written)
    query_start_loc: Tensor  # [B+1] int32, cumulative query lengths
    seq_lens: Tensor  # [B] int32, context length after this step (new tokens included)
    block_tables: Tensor  # [B, max_blocks] int32, padded
    max_query_len: int
    max_seq_len: int


def dense_causal_attention(query: Tensor, key: Tensor, value: Tensor, query_start_loc: Tensor,
                           scale: float, sliding_window: int | None = None,
                           alibi_slopes: Tensor | None = None) -> Tensor:
    """Causal attention over packed whole sequences without a KV cache (memory-profiling run).

    query [T, H, d], key/value [T, KVH, d]; sequence i = rows query_start_loc[i]:[i+1], starting
    at position 0. Uses SDPA per sequence so that the profiling run's peak memory resembles a
    fused kernel's rather than a materialised [H, T, T] score matrix (with ALiBi,
    `alibi_slopes` [H], the bias is such a matrix: slope_h * (j - i) on the visible keys).
    """
    out = torch.empty_like(query)
    group = query.shape[1] // key.shape[1]
    starts = query_start_loc.tolist()
    for i in range(len(starts) - 1):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        q = query[s:e].transpose(0, 1)  # [H, n, d]
        k = key[s:e].repeat_interleave(group, dim=1).transpose(0, 1)
        v = value[s:e].repeat_interleave(group, dim=1).transpose(0, 1)
        if alibi_slopes is not None:
            pos = torch.arange(e - s, device=query.device)
            dist = (pos[None, :] - pos[:, None]).to(q.dtype)  # [n, n]
            visible = pos[None, :] <= pos[:, None]
            if sliding_window is not None:
                visible &= pos[None, :] > pos[:, None] - sliding_window
            bias = alibi_slopes.to(q.dtype)[:, None, None] * dist[None]
            bias = bias.masked_fill(~visible[None], float("-inf"))  # [H, n, n]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        elif sliding_window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            pos = torch.arange(e - s, device=query.device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - sliding_window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1)
    if starts[-1] < query.shape[0]:
        out[starts[-1]:] = 0  # padding rows
    return out


class Attention(nn.Module):
    """Writes the new tokens' K/V into the paged cache, then attends over each request's context.

    No parameters: projections, rotary and q/k norms live in the model's attention block.
    `alibi_slopes` [num_heads] (this rank's heads; Baichuan-13B): ALiBi biases, passed to the
    backend only when set, so other models' calls are unchanged.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 ctx: BuildContext, sliding_window: int | None = None,
                 alibi_slopes: Tensor | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads "
                f"({num_kv_heads})")
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        if alibi_slopes is not None and alibi_slopes.shape != (num_heads,):
            raise ValueError(f"alibi_slopes must be [{num_heads}], got {tuple(alibi_slopes.shape)}")
        self.alibi_slopes: Tensor | None
        # A buffer (moves with the model); float32 whatever the model dtype. Not in state_dict.
        self.register_buffer("alibi_slopes", alibi_slopes.float() if alibi_slopes is not None else None,
                             persistent=False)
        self.backend: AttentionBackend = ctx.attention
        self._pass_max_lens = self.backend.accepts_max_lens  # fixed at construction
        if alibi_slopes is not None:  # bound once: the plain path below stays as it was
            self._attend = self._attend_alibi  # type: ignore[method-assign]

    def forward(self, q: Tensor, k: Tensor, v: Tensor,
                kv_cache: tuple[Tensor, Tensor] | tuple[()] | None,
                attn_metadata: AttentionMetadata) -> Tensor:
        """q [T, H*d], k/v [T, KVH*d] -> [T, H*d]. kv_cache None/() = profiling: dense fallback."""
        num_tokens = q.shape[0]
        query = q.view(num_tokens, self.num_heads, self.head_dim)
        key = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if not kv_cache:
            out = dense_causal_attention(query, key, value, attn_metadata.query_start_loc,
                                         self.scale, self.sliding_window, self.alibi_slopes)
        else:
            key_cache, value_cache = kv_cache
            self.backend.write_kv(key, value, key_cache, value_cache, attn_metadata.slot_mapping)
            out = self._attend(query, key_cache, value_cache, attn_metadata)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def forward_rotary(self, positions: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       rotary: RotaryEmbedding,
                       kv_cache: tuple[Tensor, Tensor] | tuple[()] | None,
                       attn_metadata: AttentionMetadata) -> Tensor:
        """rotary(q, k) at `positions`, then forward(). q [T, H*d], k/v [T, KVH*d] -> [T, H*d].

        With a cache and a backend that has `rotary_write_kv`, the rotation and the KV write are
        one launch and q is rotated IN PLACE (q is a view of the QKV projection output, or the
        q-norm output, that nothing reads afterwards). Otherwise (torch backend, profiling run
        without a cache): `rotary` then forward(), as separate steps.
        """
        fused = self.backend.rotary_write_kv
        if fused is None or not kv_cache:
            q, k = rotary(positions, q, k)
            return self(q, k, v, kv_cache, attn_metadata)
        num_tokens = q.shape[0]
        query = q.view(num_tokens, self.num_heads, self.head_dim)
        key = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        fused(positions, query, key, value, rotary.cos_sin_cache, rotary.is_neox, key_cache,
              value_cache, attn_metadata.slot_mapping)
        out = self._attend(query, key_cache, value_cache, attn_metadata)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _attend(self, query: Tensor, key_cache: Tensor, value_cache: Tensor,
                md: AttentionMetadata) -> Tensor:
        if self._pass_max_lens:
            return self.backend.attend(query, key_cache, value_cache, md.block_tables, md.seq_lens,
                                       md.query_start_loc, self.scale, self.sliding_window,
                                       max_query_len=md.max_query_len, max_seq_len=md.max_seq_len)
        return self.backend.attend(query, key_cache, value_cache, md.block_tables, md.seq_lens,
                                   md.query_start_loc, self.scale, self.sliding_window)

    def _attend_alibi(self, query: Tensor, key_cache: Tensor, value_cache: Tensor,
                      md: AttentionMetadata) -> Tensor:
        extra = ({"max_query_len": md.max_query_len, "max_seq_len": md.max_seq_len}
                 if self._pass_max_lens else {})
        return self.backend.attend(query, key_cache, value_cache, md.block_tables, md.seq_lens,
                                   md.query_start_loc, self.scale, self.sliding_window,
                                   alibi_slopes=self.alibi_slopes, **extra)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"sliding_window={self.sliding_window}, alibi={self.alibi_slopes is not None}, "
                f"backend={self.backend.name}")
