"""The attention-backend type: the functions an `Attention` layer calls (kernels/, so that
model_executor/layers depends on kernels and never the reverse).

A backend is a pair of functions with the signatures of the plain-torch twins in
`pagedserve.kernels.reference` (`write_kv_cache`, `paged_attention`), plus an optional fused
rotary + KV write (`rotary_write_kv_cache`) that `Attention.forward_rotary` uses when present
(one launch instead of two at every layer of a decode step). Backends are part of a `KernelSet`
(kernels/registry.py), chosen once at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from pagedserve.kernels import reference

__all__ = ["AttendFn", "AttentionBackend", "RotaryWriteKVFn", "TORCH_ATTENTION", "WriteKVFn"]

WriteKVFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]
AttendFn = Callable[..., Tensor]  # the `reference.paged_attention` signature
RotaryWriteKVFn = Callable[..., Tensor]  # the `reference.rotary_write_kv_cache` signature


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    name: str
    write_kv: WriteKVFn  # (key, value, key_cache, value_cache, slot_mapping) -> None
    attend: AttendFn  # (query, key_cache, value_cache, block_tables, seq_lens,
    #                    query_start_loc, scale, sliding_window=None) -> [T, H, d]
    # True: `attend` also takes keyword-only max_query_len / max_seq_len (host-side ints from the
    # metadata), which lets a GPU backend pick its kernel and grid without a device sync.
    accepts_max_lens: bool = False
    # (positions, query, key, value, cos_sin_cache, is_neox, key_cache, value_cache, slot_mapping)
    # -> query rotated in place; rotated key and value written to the cache. None: rotary, then
    # write_kv (two launches).
    rotary_write_kv: RotaryWriteKVFn | None = None


# The plain-torch twins, no fused entry (the CPU path and the oracle).
TORCH_ATTENTION = AttentionBackend("torch", write_kv=reference.write_kv_cache, attend=reference.paged_attention)
