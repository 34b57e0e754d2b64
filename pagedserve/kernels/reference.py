"""Plain-torch twins of every kernel: the CPU path and the oracle for the Triton kernels.

Written for clarity, not speed: per-request loops, float32 math, no in-place tricks beyond the
KV-cache write. Every Triton kernel in `kernels/triton/` must match the twin of the same name.

Paged KV-cache layout (shared by all attention code):

    key_cache / value_cache: [num_blocks, block_size, num_kv_heads, head_dim]

    slot = block_id * block_size + offset_in_block

    request i, logical token position p  ->  block_tables[i, p // block_size], offset p % block_size

    block_tables[i] = [ 7, 2, 9, -- padding -- ]      (block_size = 4)
    positions          0..3  4..7  8..11
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "alibi_slopes",
    "write_kv_cache",
    "paged_attention",
    "varlen_causal_attention",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "rotary_write_kv_cache",
]


def write_kv_cache(
    key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor
) -> None:
    """Scatter the new tokens' K/V into their cache slots (in place).

    key, value: [T, num_kv_heads, head_dim]; key_cache, value_cache:
    [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping: [T] int64, -1 = padding token
    (not written). Works on non-contiguous caches (indexing by (block, offset), not a flat view).
    """
    block_size = key_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].to(torch.long)
    block_idx = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots % block_size
    key_cache[block_idx, offsets] = key[valid].to(key_cache.dtype)
    value_cache[block_idx, offsets] = value[valid].to(value_cache.dtype)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes [num_heads] float32, as published (Press et al.; Baichuan-13B's
    `_get_interleave`, BLOOM's `build_alibi_tensor`): for n a power of two, head h gets
    2^(-8 (h+1) / n); otherwise the closest power of two below n, then every other slope of
    twice that count for the remaining heads."""
    closest = 2 ** math.floor(math.log2(num_heads))

    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    slopes = powers(closest)
    if closest < num_heads:
        slopes += powers(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def _attend_one(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
                sliding_window: int | None, alibi_slopes: Tensor | None = None) -> Tensor:
    """Masked softmax attention for one request, all in float32.

    q: [q_len, num_heads, head_dim]; k, v: [kv_len, num_kv_heads, head_dim];
    q_pos: [q_len], k_pos: [kv_len] absolute positions; alibi_slopes [num_heads] adds
    slope_h * (k_pos - q_pos) to head h's scores. Returns [q_len, num_heads, head_dim] fp32.
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_heads // num_kv_heads
    qf = q.float()
    kf = k.float().repeat_interleave(group, dim=1)  # [kv_len, num_heads, head_dim]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", qf, kf) * scale  # [num_heads, q_len, kv_len]
    if alibi_slopes is not None:
        dist = (k_pos[None, :] - q_pos[:, None]).float()  # [q_len, kv_len], <= 0 where visible
        scores = scores + alibi_slopes.float().to(scores.device)[:, None, None] * dist[None]
    allowed = k_pos[None, :] <= q_pos[:, None]  # [q_len, kv_len]
    if sliding_window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf)


def paged_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    alibi_slopes: Tensor | None = None,
) -> Tensor:
    """Attention of packed new tokens over each request's paged context.

    query: [T, num_heads, head_dim], B requests back to back; block_tables: [B, max_blocks] int32;
    seq_lens: [B] = context length after this step (new tokens included); query_start_loc: [B+1].
    Request i's query j is at absolute position seq_lens[i] - q_len_i + j; it sees cached keys at
    positions <= its own and > pos - sliding_window. Rows of `query` past query_start_loc[B]
    (padding) come back as zeros. alibi_slopes [num_heads] float32: ALiBi biases (see _attend_one). Returns [T, num_heads, head_dim] in query's dtype.
    """
    block_size = key_cache.shape[1]
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        n_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[i, :n_blocks].to(torch.long)
        # [n_blocks, block_size, kvh, d] -> [n_blocks*block_size, kvh, d] -> first seq_len tokens
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k_pos = torch.arange(seq_len, device=query.device)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        out[q_start:q_end] = _attend_one(query[q_start:q_end], k, v, q_pos, k_pos, scale,
                                         sliding_window, alibi_slopes)
    return out.to(query.dtype)


def varlen_causal_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    query_start_loc: Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    alibi_slopes: Tensor | None = None,
) -> Tensor:
    """Dense causal attention over packed whole sequences, no KV cache (profiling / prefill-only).

    query: [T, num_heads, head_dim]; key, value: [T, num_kv_heads, head_dim]; sequence i is rows
    query_start_loc[i]:query_start_loc[i+1] and starts at position 0. Returns query's shape/dtype.
    """
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    for i in range(len(starts) - 1):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        pos = torch.arange(e - s, device=query.device)
        out[s:e] = _attend_one(query[s:e], key[s:e], value[s:e], pos, pos, scale, sliding_window,
                                 alibi_slopes)
    return out.to(query.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: x [..., H], weight [H]. Normalises in float32, then casts back
    to x's dtype before the weight multiply (the Hugging Face Llama order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is taken in x's dtype."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary_embedding(
    positions: Tensor,
    query: Tensor,
    key: Tensor,
    cos_sin_cache: Tensor,
    is_neox: bool = True,
) -> tuple[Tensor, Tensor]:
    """Rotary position embedding.

    positions [T] int64; query [T, num_heads, head_dim]; key [T, num_kv_heads, head_dim];
    cos_sin_cache [max_position, rot_dim] float32: cos in the first rot_dim//2 columns, sin in the
    rest. Only the first rot_dim features of each head rotate (rot_dim == head_dim for Llama).
    is_neox=True pairs feature j with j + rot_dim//2 (HF "rotate_half"); False pairs 2j with 2j+1.
    Returns new (query, key) in their input dtypes.
    """
    cos_sin = cos_sin_cache[positions.to(torch.long)]  # [T, rot_dim]
    half = cos_sin.shape[-1] // 2
    cos = cos_sin[:, None, :half].float()  # [T, 1, rot_dim/2], broadcast over heads
    sin = cos_sin[:, None, half:].float()

    def rotate(x: Tensor) -> Tensor:
        rot_dim = 2 * half
        xr = x[..., :rot_dim].float()
        if is_neox:
            x1, x2 = xr[..., :half], xr[..., half:]
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((rotated.to(x.dtype), x[..., rot_dim:]), dim=-1)

    return rotate(query), rotate(key)


def rotary_write_kv_cache(
    positions: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cos_sin_cache: Tensor,
    is_neox: bool,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_mapping: Tensor,
) -> Tensor:
    """rotary_embedding then write_kv_cache of the rotated key (one fused launch on the GPU).

    Shapes as in those two twins. `query` is rotated IN PLACE and returned; key/value are left
    unchanged; K/V rows whose slot is -1 are not written (their query is still rotated).
    """
    q_rot, k_rot = rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    write_kv_cache(k_rot, value, key_cache, value_cache, slot_mapping)
    return query.copy_(q_rot)


def silu_and_mul(x: Tensor) -> Tensor:
    """x [T, 2*I] = [gate | up] -> silu(gate) * up, [T, I]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def argmax_rows(x: Tensor) -> Tensor:
    """x [N, V] -> [N] int64 index of each row's max; ties go to the lowest index."""
    return x.argmax(dim=-1)


def fused_gemv_reference(
    x: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    out: Tensor | None = None,
    residual_out: Tensor | None = None,
    weight_scale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Twin of triton.gemv.fused_gemv: x [M, K] @ weight [N, K].T (+ bias), float32 accumulate.

    weight_scale (float32 [] / [1] or [N]): weight is float8_e4m3fn and stands for weight * scale
    (per tensor or per output row), applied to the float32 dot products before bias and gating.

    norm_weight [K]: x becomes rms_norm(x [+ residual]) * norm_weight first and the result is
    (out, s) with s = x + residual (or x). gated: weight [2*I, K] = [gate | up] and out [M, I] =
    silu(gate) * up, gate and up kept in float32 and rounded once. out / residual_out, when given,
    receive the results (copies here)."""
    s = x
    if norm_weight is not None:
        if residual is not None:
            x, s = fused_add_rms_norm(x, residual, norm_weight, eps)
        else:
            x = rms_norm(x, norm_weight, eps)
    y = x.float() @ weight.float().T
    if weight_scale is not None:
        y = y * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    if gated:
        inter = weight.shape[0] // 2
        y = F.silu(y[:, :inter]) * y[:, inter:]
    result = y.to(x.dtype)
    if out is not None:
        result = out.copy_(result)
    if residual_out is not None and residual is not None:
        s = residual_out.copy_(s)
    return result if norm_weight is None else (result, s)
