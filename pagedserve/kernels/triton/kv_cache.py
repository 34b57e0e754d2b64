"""Triton scatter of new K/V rows into the paged KV cache (twin: reference.write_kv_cache).

Slot arithmetic (one slot per cached token)::

    slot = block_id * block_size + offset_in_block        (slot == -1: padding, skipped)

    key[t]  ----------------------------->  key_cache[slot // block_size, slot % block_size]
    [num_kv_heads, head_dim]                [num_kv_heads, head_dim]

One program per token; it moves all heads of that token at once (num_kv_heads * head_dim values,
a few KB) so each program issues wide, coalesced loads and stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    block_size,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size

    heads = tl.arange(0, HEADS_PAD)[:, None]  # [HEADS_PAD, 1]
    dims = tl.arange(0, DIM_PAD)[None, :]  # [1, DIM_PAD]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)

    k = tl.load(key_ptr + t * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + heads * stride_vh + dims, mask=mask)
    kc = key_cache_ptr + block * stride_kc_block + offset * stride_kc_slot
    vc = value_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
    tl.store(kc + heads * stride_kc_head + dims, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc + heads * stride_vc_head + dims, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, num_kv_heads, head_dim] into the caches
    [num_blocks, block_size, num_kv_heads, head_dim] at slot_mapping [T] (-1 = skip).

    The last dimension of every tensor must be contiguous (stride 1); other strides are free, so
    key/value may be views into a fused QKV projection output.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} must equal key shape {tuple(key.shape)}")
    if key_cache.shape != value_cache.shape or key_cache.dim() != 4:
        raise ValueError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]"
        )
    if key_cache.shape[2] != num_kv_heads or key_cache.shape[3] != head_dim:
        raise ValueError(
            f"cache heads/dim {tuple(key_cache.shape[2:])} do not match key {(num_kv_heads, head_dim)}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must have shape [{num_tokens}], got {tuple(slot_mapping.shape)}")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    _write_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        key_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
