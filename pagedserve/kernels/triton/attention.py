"""paged_attention dispatcher (twin: reference.paged_attention).

Pure-decode batches (every request has one new token) go to the flash-decoding kernel
(attention_decode.py); anything else (prefill, chunked prefill with a cached prefix, mixed
prefill + decode) goes to the tiled varlen kernel (attention_prefill.py), which handles decode rows
too. Tuning knobs live in AttentionTuning so the H100 runs can change them in one place.

H100 measurements with the defaults (bf16, 32 q / 8 kv heads, head_dim 128, block 16, timed
through CUDA graphs; eager calls add ~100 us of host launch overhead per call on the test VM):
  decode (K+V bytes / time): B=1 ctx 4096 12 us; B=4 ctx 2048 13 us (2.5 TB/s); B=16 ctx 2048
    57 us (2.3 TB/s); B=64 ctx 2048 190 us (2.8 TB/s); B=128 ctx 4096 734 us (2.9 TB/s).
    Small batches want short partitions (more programs), large ones 1024 (less reduce work):
    hence the program-count rule.
  prefill (causal FLOPs / time): 4 x 2048 prompts 513 us, 268 TFLOP/s (SDPA dense MHA: 463);
    one 8192 prompt 299 TFLOP/s (PrefillTiles(128, 128, 8, 3, True) reached 346; SDPA 535);
    2 x 512-token chunks over 3584 cached tokens 295 TFLOP/s; a 512 chunk + 128 decode rows of
    context 2048 in one batch 425 us.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pagedserve.kernels.triton.attention_decode import paged_decode_attention
from pagedserve.kernels.triton.attention_prefill import paged_prefill_attention


@dataclass(frozen=True, slots=True)
class PrefillTiles:
    """Launch shape of the prefill kernel."""

    block_m: int  # query rows (tokens x GQA heads) per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int
    k_trans: bool  # gather K as [keys, dim] and transpose in registers (faster on H100)


@dataclass(frozen=True, slots=True)
class AttentionTuning:
    """Launch parameters. Defaults were picked from sweeps on an H100 (bf16, 32 q / 8 kv heads,
    head_dim 128, block_size 16, timed through CUDA graphs); measurements in the module docstring."""

    # Decode: None = choose the largest partition in DECODE_PARTITIONS that still gives
    # >= decode_target_programs programs (B * num_kv_heads * partitions).
    decode_partition_size: int | None = None
    decode_target_programs: int | None = None  # None: 4 x the device's SM count
    decode_block_n: int = 64
    decode_num_warps: int = 2
    decode_num_stages: int = 3
    # Prefill: long tiles when the average query length T / B is >= prefill_long_min_avg_q
    # (prompts, big chunks), short tiles for decode-heavy mixed batches.
    prefill_long: PrefillTiles = PrefillTiles(128, 32, 4, 3, True)
    prefill_short: PrefillTiles = PrefillTiles(64, 64, 4, 2, True)
    prefill_long_min_avg_q: int = 128


DEFAULT_TUNING = AttentionTuning()
DECODE_PARTITIONS = (1024, 512, 256, 128)
_NOMINAL_SMS = 132  # H100 SXM; used when the device is not CUDA (interpreter)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _NOMINAL_SMS
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _decode_partition(
    tuning: AttentionTuning, num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device
) -> int:
    if tuning.decode_partition_size is not None:
        return tuning.decode_partition_size
    target = tuning.decode_target_programs or 4 * _num_sms(device)
    fits = [p for p in DECODE_PARTITIONS if p % tuning.decode_block_n == 0]
    if not fits:
        return tuning.decode_block_n
    for part in fits:
        if num_seqs * num_kv_heads * -(-max_seq_len // part) >= target:
            return part
    return fits[-1]


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
            partition_size=_decode_partition(tuning, num_seqs, key_cache.shape[2], max_seq_len, query.device),
            block_n=tuning.decode_block_n,
            num_warps=tuning.decode_num_warps,
            num_stages=tuning.decode_num_stages,
        )
    # T / B >= threshold, without a sync: long tiles for prompts and big chunks.
    long = query.shape[0] >= tuning.prefill_long_min_avg_q * num_seqs
    tiles = tuning.prefill_long if long else tuning.prefill_short
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
        block_m=tiles.block_m,
        block_n=tiles.block_n,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        k_trans=tiles.k_trans,
    )
