"""paged_attention dispatcher (twin: reference.paged_attention).

Pure-decode batches (every request has one new token) go to the flash-decoding kernel
(attention_decode.py); anything else (prefill, chunked prefill with a cached prefix, mixed
prefill + decode) goes to the tiled varlen kernel (attention_prefill.py), which handles decode rows
too. Tuning knobs live in AttentionTuning so the H100 runs can change them in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.kernels.triton.attention_decode import paged_decode_attention
from pagedserve.kernels.triton.attention_prefill import paged_prefill_attention


@dataclass(slots=True)
class AttentionTuning:
    """Launch parameters (defaults chosen for H100, head_dim 64/128, bf16)."""

    decode_partition_size: int = 512  # context tokens per decode program (flash-decoding split)
    decode_block_n: int = 64  # keys per inner step of a decode program
    decode_num_warps: int = 4
    decode_num_stages: int = 2
    prefill_block_m: int = 64  # query rows (tokens x GQA heads) per prefill program
    prefill_block_n: int = 64  # keys per inner step of a prefill program
    prefill_num_warps: int = 4
    prefill_num_stages: int = 2


DEFAULT_TUNING = AttentionTuning()


def _validate(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    sliding_window: int | None,
) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [T, num_heads, head_dim], got {tuple(query.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache/value_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]"
        )
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {key_cache.shape[3]} != query head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if query.dtype != key_cache.dtype or key_cache.dtype != value_cache.dtype:
        raise ValueError(f"query/cache dtypes differ: {query.dtype}, {key_cache.dtype}, {value_cache.dtype}")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [B={num_seqs}, max_blocks], got {tuple(block_tables.shape)}")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"query_start_loc must have shape [{num_seqs + 1}], got {tuple(query_start_loc.shape)}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    tuning: AttentionTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """Attention of packed new tokens query [T, num_heads, head_dim] over the paged cache.

    Same contract as reference.paged_attention. Extra keyword-only arguments:
      max_query_len: max over requests of q_len; computed from query_start_loc (a host sync) when
        omitted. Selects the decode kernel when it is 1.
      max_seq_len: any upper bound of seq_lens, sizes the decode grid; defaults to
        block_tables.shape[1] * block_size (no sync).
      out: preallocated [T, num_heads, head_dim] output in query's dtype. Rows no request owns
        (past query_start_loc[B]) are left as they are; without `out` they are zeros, as in the twin.
    """
    _validate(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, sliding_window)
    if out is None:
        # zeros: padding rows past query_start_loc[B] come back as 0 (twin contract); the memset is
        # tiny next to the attention itself.
        out = torch.zeros_like(query)
    num_seqs = seq_lens.shape[0]
    if query.shape[0] == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    if max_query_len == 1:
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * key_cache.shape[1]
        return paged_decode_attention(
            query,
            key_cache,
            value_cache,
            block_tables,
            seq_lens,
            query_start_loc,
            scale,
            sliding_window,
            out,
            max_seq_len,
            partition_size=tuning.decode_partition_size,
            block_n=tuning.decode_block_n,
            num_warps=tuning.decode_num_warps,
            num_stages=tuning.decode_num_stages,
        )
    return paged_prefill_attention(
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        sliding_window,
        out,
        block_m=tuning.prefill_block_m,
        block_n=tuning.prefill_block_n,
        num_warps=tuning.prefill_num_warps,
        num_stages=tuning.prefill_num_stages,
    )
