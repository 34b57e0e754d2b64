"""paged_attention dispatcher (twin: reference.paged_attention).

Pure-decode batches (every request has one new token) go to the flash-decoding kernel
(attention_decode.py); anything else (prefill, chunked prefill with a cached prefix, mixed
prefill + decode) goes to the tiled varlen kernel (attention_prefill.py), which handles decode rows
too. Tuning knobs live in AttentionTuning so the H100 runs can change them in one place.

Decode, H200, bf16, 32 q / 8 kv heads, head_dim 128, block 16, grid sized for max_seq_len 4096
(as in the decode CUDA graphs), us per layer from benchmarks/attention_bench.py (graph of 32
layers; "old" = static partitions + zeros memset, before the device-side split):
    B=1 ctx 128: 8.9 -> 5.6;  B=1 ctx 2048: 12.1 -> 9.6;  B=64 ctx 2048: 133.9 -> 125.8;
    B=256 ctx 2048: 507.7 -> 485.2 (4.4 TB/s of K+V).  B=16 ctx 2048 old: 40.8 (the rule now gives it
    the pipelined tiles; the unpipelined ones measured 59.8 there).
  Earlier H100 prefill numbers with the defaults (timed through CUDA graphs):
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
class DecodeTiles:
    """Launch shape of the decode partition kernel."""

    block_n: int  # keys per inner step (also the partition granularity)
    num_warps: int
    num_stages: int


@dataclass(frozen=True, slots=True)
class AttentionTuning:
    """Launch parameters. Defaults were picked from sweeps on an H100 (bf16, 32 q / 8 kv heads,
    head_dim 128, block_size 16, timed through CUDA graphs); measurements in the module docstring."""

    # Decode: P partition slots per (request, KV head); each request's context is split over
    # them on the device (attention_decode.py). None = ceil(decode_target_programs /
    # (B * num_kv_heads)), at least cdiv(max_seq_len, decode_max_partition), at most the number
    # of tiles in max_seq_len. decode_partition_size (tests) fixes P = cdiv(max_seq_len, it).
    decode_partition_size: int | None = None
    decode_target_programs: int | None = None  # None: 2 x the device's SM count
    decode_max_partition: int = 4096
    # Fewest keys per partition (device side): contexts up to this are one program per KV head
    # writing the output directly (no reduce). 0 = one tile.
    decode_min_partition: int = 128
    # Latency-bound batches (4 * B * num_kv_heads <= SMs): unpipelined 128-key tiles and as many
    # partition slots as tiles in max_seq_len (at most decode_small_max_partitions), so a program
    # does about one tile. Otherwise bandwidth-bound: pipelined 64-key tiles, P from the program
    # target (unpipelined multi-tile loops are slow: B=16 measured 1.5x slower with them).
    # decode_tiles, when set, is used for every batch (with the program-target rule).
    decode_small: DecodeTiles = DecodeTiles(128, 4, 1)
    decode_large: DecodeTiles = DecodeTiles(64, 2, 3)
    decode_small_max_partitions: int = 64
    decode_tiles: DecodeTiles | None = None
    # Prefill: long tiles when the average query length T / B is >= prefill_long_min_avg_q
    # (prompts, big chunks), short tiles for decode-heavy mixed batches.
    prefill_long: PrefillTiles = PrefillTiles(128, 32, 4, 3, True)
    prefill_short: PrefillTiles = PrefillTiles(64, 64, 4, 2, True)
    prefill_long_min_avg_q: int = 128


DEFAULT_TUNING = AttentionTuning()
_NOMINAL_SMS = 132  # H100 SXM; used when the device is not CUDA (interpreter)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _NOMINAL_SMS
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _decode_launch(
    tuning: AttentionTuning, num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device
) -> tuple[DecodeTiles, int]:
    """(tiles, P): the decode kernel's launch shape and its number of partition slots."""
    sms = _num_sms(device)
    small = tuning.decode_tiles is None and 4 * num_seqs * num_kv_heads <= sms
    tiles = tuning.decode_tiles or (tuning.decode_small if small else tuning.decode_large)
    max_parts = max(1, -(-max_seq_len // tiles.block_n))
    if small and tuning.decode_partition_size is None:
        return tiles, min(max_parts, tuning.decode_small_max_partitions)
    if tuning.decode_partition_size is not None:
        parts = -(-max_seq_len // tuning.decode_partition_size)
    else:
        target = tuning.decode_target_programs or 2 * sms
        parts = max(-(-target // (num_seqs * num_kv_heads)), -(-max_seq_len // tuning.decode_max_partition))
    return tiles, min(max(parts, 1), max_parts)


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
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed new tokens query [T, num_heads, head_dim] over the paged cache.

    Same contract as reference.paged_attention. Extra keyword-only arguments:
      max_query_len: max over requests of q_len; computed from query_start_loc (a host sync) when
        omitted. Selects the decode kernel when it is 1.
      max_seq_len: any upper bound of seq_lens, sizes the decode grid; defaults to
        block_tables.shape[1] * block_size (no sync).
      out: preallocated [T, num_heads, head_dim] output in query's dtype. Rows no request owns
        (past query_start_loc[B]) are left as they are; without `out` they are zeros, as in the twin.
      alibi_slopes: [num_heads] float32 on query's device: ALiBi biases (as the twin); the kernels
        then run their ALIBI specialisation. None (every rotary model) = the plain kernels.

    A decode batch (max_query_len == 1) must give every request exactly one query row, so rows
    [0, B) are all written by the kernel: the output is then allocated uninitialised and only rows
    [B, T) are zero-filled (none in a CUDA graph, where T == B). That saves a memset per layer.
    """
    _validate(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, sliding_window)
    if alibi_slopes is not None and (alibi_slopes.shape != (query.shape[1],)
                                     or alibi_slopes.dtype != torch.float32):
        raise ValueError(f"alibi_slopes must be float32 [{query.shape[1]}], got "
                         f"{alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")
    num_seqs = seq_lens.shape[0]
    num_tokens = query.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return torch.zeros_like(query) if out is None else out
    if max_query_len is None:
        # One sync. The decode kernel needs every q_len == 1 (a q_len-0 request owns no row).
        lo_q, hi_q = torch.stack(torch.aminmax(query_start_loc[1:] - query_start_loc[:-1])).tolist()
        decode = lo_q == hi_q == 1
    else:
        decode = max_query_len == 1
    if decode:
        if out is None:
            out = torch.empty_like(query)
            if num_tokens > num_seqs:
                out[num_seqs:].zero_()  # padding rows past query_start_loc[B] == B
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * key_cache.shape[1]
        dtiles, num_parts = _decode_launch(tuning, num_seqs, key_cache.shape[2], max_seq_len, query.device)
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
            num_parts,
            block_n=dtiles.block_n,
            num_warps=dtiles.num_warps,
            num_stages=dtiles.num_stages,
            min_partition=tuning.decode_min_partition,
            alibi_slopes=alibi_slopes,
        )
    if out is None:
        out = torch.zeros_like(query)  # padding rows past query_start_loc[B]: zeros (twin contract)
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
        alibi_slopes=alibi_slopes,
    )
