"""Triton rotary position embedding (twin: reference.rotary_embedding).

cos_sin_cache [max_position, rot_dim] float32 holds cos in columns [0, rot_dim/2) and sin in
[rot_dim/2, rot_dim); row p is gathered for a token at position p. The first rot_dim features of
each head are rotated (rot_dim == head_dim for every model we ship; a smaller rot_dim leaves the
tail of the head unchanged). Pairs (x1, x2) are rotated by the angle of column i:

    neox (rotate_half):  x1 = x[i],      x2 = x[i + rot_dim/2]
    gpt-j (interleaved): x1 = x[2i],     x2 = x[2i + 1]
    x1' = x1 * cos - x2 * sin,  x2' = x2 * cos + x1 * sin       (float32, rounded once)

One program per token handles all query heads and all key heads, so the cos/sin row is loaded once.

rotary_write_kv_cache (below) fuses this with the KV-cache write of kv_cache.py for the attention
backend: q rotated in place, rotated k and v stored straight into their cache slot, one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    stride_src_h,
    stride_dst_h,
    cos,
    sin,
    num_heads,
    head_dim,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    TAIL_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    # cos, sin: [1, HALF_PAD] float32. Tile: [HEADS_PAD, HALF_PAD].
    heads = tl.arange(0, HEADS_PAD)[:, None]
    cols = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (cols < HALF)
    if IS_NEOX:
        off1 = cols
        off2 = cols + HALF
    else:
        off1 = 2 * cols
        off2 = 2 * cols + 1
    x1 = tl.load(src_ptr + heads * stride_src_h + off1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + heads * stride_src_h + off2, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    ty = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + heads * stride_dst_h + off1, y1.to(ty), mask=mask)
    tl.store(dst_ptr + heads * stride_dst_h + off2, y2.to(ty), mask=mask)
    if TAIL_PAD > 0:
        # Features past rot_dim pass through unchanged.
        tail = 2 * HALF + tl.arange(0, TAIL_PAD)[None, :]
        tmask = (heads < num_heads) & (tail < head_dim)
        t = tl.load(src_ptr + heads * stride_src_h + tail, mask=tmask)
        tl.store(dst_ptr + heads * stride_dst_h + tail, t.to(ty), mask=tmask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cache,
    num_heads,
    num_kv_heads,
    head_dim,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    TAIL_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)[None, :]
    cmask = cols < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + cols, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh, cos, sin,
        num_heads, head_dim, HALF, HALF_PAD, Q_HEADS_PAD, TAIL_PAD, IS_NEOX,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, stride_kh, stride_koh, cos, sin,
        num_kv_heads, head_dim, HALF, HALF_PAD, K_HEADS_PAD, TAIL_PAD, IS_NEOX,
    )  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int; query [T, num_heads, head_dim]; key [T, num_kv_heads, head_dim];
    cos_sin_cache [max_position, rot_dim] float32 -> new (query, key), same dtypes and shapes.

    Positions must lie in [0, max_position); they are not checked on the device (no sync).
    """
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError("query and key must be [T, heads, head_dim]")
    num_tokens, num_heads, head_dim = query.shape
    if key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query shape {tuple(query.shape)}")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must have shape [{num_tokens}], got {tuple(positions.shape)}")
    rot_dim = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or rot_dim % 2 != 0 or rot_dim > head_dim:
        raise ValueError(f"cos_sin_cache must be [max_position, rot_dim], rot_dim even and <= {head_dim}")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("query, key and cos_sin_cache must be contiguous in their last dimension")
    q_out = torch.empty_like(query)
    k_out = torch.empty_like(key)
    if num_tokens == 0:
        return q_out, k_out
    half = rot_dim // 2
    tail = head_dim - rot_dim
    _rotary_kernel[(num_tokens,)](
        positions,
        query,
        key,
        q_out,
        k_out,
        cos_sin_cache,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        cos_sin_cache.stride(0),
        num_heads,
        key.shape[1],
        head_dim,
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        K_HEADS_PAD=triton.next_power_of_2(key.shape[1]),
        TAIL_PAD=triton.next_power_of_2(tail) if tail > 0 else 0,
        IS_NEOX=is_neox,
        num_warps=4,
    )
    return q_out, k_out


# --- rotary + KV-cache write, one launch (twin: reference.rotary_write_kv_cache) ----------------
#
# Grid (T, 3): for token t, program (t, 0) rotates the query heads in place, (t, 1) rotates the
# key heads straight into their cache slot, (t, 2) copies the value heads into theirs. Three
# programs per token instead of one so that at batch 1 the three independent load chains
# (position -> cos/sin, slot) run on three SMs side by side; each program is a single wave of loads.
#
#   slot = slot_mapping[t]  (-1: padding, K/V not written; q is still rotated)
#   key_cache[slot // block_size, slot % block_size] <- rotate(key[t])
#   value_cache[...same slot...]                     <- value[t]


@triton.jit
def _rotary_write_kv_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
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
    stride_cache,
    block_size,
    num_heads,
    num_kv_heads,
    head_dim,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    TAIL_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    role = tl.program_id(1)  # 0: query, 1: key, 2: value
    if role == 2:
        slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        if slot >= 0:
            heads = tl.arange(0, K_HEADS_PAD)[:, None]
            dims = tl.arange(0, DIM_PAD)[None, :]
            mask = (heads < num_kv_heads) & (dims < head_dim)
            v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + dims, mask=mask)
            vc = value_cache_ptr + (slot // block_size) * stride_vc_block + (slot % block_size) * stride_vc_slot
            tl.store(vc + heads * stride_vc_head + dims, v.to(value_cache_ptr.dtype.element_ty), mask=mask)
    else:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cols = tl.arange(0, HALF_PAD)[None, :]
        cmask = cols < HALF
        cos = tl.load(cache_ptr + pos * stride_cache + cols, mask=cmask, other=0.0).to(tl.float32)
        sin = tl.load(cache_ptr + pos * stride_cache + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
        if role == 0:
            q_t = q_ptr + t * stride_qt
            _rotate_heads(
                q_t, q_t, stride_qh, stride_qh, cos, sin,
                num_heads, head_dim, HALF, HALF_PAD, Q_HEADS_PAD, TAIL_PAD, IS_NEOX,
            )  # fmt: skip
        else:
            slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
            if slot >= 0:
                kc = key_cache_ptr + (slot // block_size) * stride_kc_block + (slot % block_size) * stride_kc_slot
                _rotate_heads(
                    k_ptr + t * stride_kt, kc, stride_kh, stride_kc_head, cos, sin,
                    num_kv_heads, head_dim, HALF, HALF_PAD, K_HEADS_PAD, TAIL_PAD, IS_NEOX,
                )  # fmt: skip


def rotary_write_kv_cache(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate query IN PLACE and write rotate(key) and value into the paged caches, one launch.

    positions [T]; query [T, num_heads, head_dim]; key/value [T, num_kv_heads, head_dim] (any
    strides with a contiguous last dimension: views into the QKV projection output are fine);
    caches [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping [T] (-1 = skip).
    Returns `query` (now rotated). `key` and `value` are left unchanged. The caches must have
    key's dtype (the rotated key is rounded once, as rotary then write would round it).
    """
    if query.dim() != 3 or key.dim() != 3 or value.shape != key.shape:
        raise ValueError("query must be [T, heads, head_dim] and key/value [T, kv_heads, head_dim]")
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query shape {tuple(query.shape)}")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"positions and slot_mapping must have shape [{num_tokens}]")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError("key_cache/value_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]")
    if key_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(f"cache heads/dim {tuple(key_cache.shape[2:])} do not match key {(num_kv_heads, head_dim)}")
    if key_cache.dtype != key.dtype or value_cache.dtype != value.dtype:
        raise ValueError(f"cache dtype {key_cache.dtype} must equal key/value dtype {key.dtype}")
    rot_dim = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or rot_dim % 2 != 0 or rot_dim > head_dim:
        raise ValueError(f"cos_sin_cache must be [max_position, rot_dim], rot_dim even and <= {head_dim}")
    for name, x in (("query", query), ("key", key), ("value", value), ("key_cache", key_cache),
                    ("value_cache", value_cache), ("cos_sin_cache", cos_sin_cache)):  # fmt: skip
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if num_tokens == 0:
        return query
    half = rot_dim // 2
    tail = head_dim - rot_dim
    _rotary_write_kv_kernel[(num_tokens, 3)](
        positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        cos_sin_cache.stride(0), key_cache.shape[1],
        num_heads, num_kv_heads, head_dim,
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        K_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
        TAIL_PAD=triton.next_power_of_2(tail) if tail > 0 else 0,
        IS_NEOX=is_neox,
        num_warps=4,
    )  # fmt: skip
    return query
