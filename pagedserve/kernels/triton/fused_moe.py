"""Triton fused mixture-of-experts (twin: kernels/reference_moe.fused_moe; same signature).

    x [T, H], w13 [E, 2I, H] (gate rows 0..I, up rows I..2I), w2 [E, H, I],
    topk_weights [T, K] float32, topk_ids [T, K] int64  ->  out [T, H]

1. Sort (torch ops, no host sync, so it can be captured in a CUDA graph): the T*K (token, slot)
   pairs are grouped by expert; each expert's group is padded up to a multiple of BLOCK_M with
   the sentinel T*K, so every BLOCK_M-row block of `sorted_ids` belongs to one expert
   (`block_expert`, -1 for the unused blocks at the end). The padded length is bounded by
   T*K + E*(BLOCK_M - 1) whatever the routing, so the grid size depends on shapes only.
   An expert that receives no token gets no block.
2. Grouped GEMM 1, SiLU-and-mul fused: for each block, rows x[sorted_id // K] times the expert's
   gate and up tiles, act = silu(gate) * up written to inter[sorted_id]  ([T*K, I]).
3. Grouped GEMM 2: inter[sorted_id] @ w2[e].T times topk_weights[sorted_id], written to
   y[sorted_id] ([T*K, H]); out = y.view(T, K, H).sum(1) (the K slots of a token).

Accumulation in float32 (float32 inputs: IEEE products, not TF32); each GEMM's result rounded
once to the activation dtype. Tile sizes per token count: kernels/triton/moe_config.py (tuned
tables measured by benchmarks/tune_moe.py, else a heuristic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.triton.moe_config import MoeConfig, select_config

__all__ = ["fused_moe", "sort_by_expert"]

BLOCK_M = 16  # sort_by_expert's default row block


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int,
                   block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] -> (sorted_ids [P] int32 with the sentinel T*K as padding, block_expert
    [P // block_m] int32, -1 past the last used block); P = T*K + E*(block_m - 1) rounded up
    to a multiple of block_m."""
    flat = topk_ids.flatten()
    n = flat.numel()
    dev = flat.device
    # scatter_add, not bincount: bincount on CUDA reads the max id back to the host
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # [E], end of each expert's padded group
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts  # start of each expert in the stable sort
    order = torch.sort(flat, stable=True).indices  # [n], pairs grouped by expert
    experts_sorted = flat[order]
    rank = torch.arange(n, device=dev) - start[experts_sorted]
    total = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((total,), n, dtype=torch.int32, device=dev)
    sorted_ids[padded_start[experts_sorted] + rank] = order.to(torch.int32)
    block_begin = torch.arange(0, total, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_begin, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, weights_ptr,
                     num_valid, n_out, k_dim, a_row_div,
                     stride_am, stride_we, stride_wn, stride_om,
                     GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of out[sorted_id] = a[sorted_id // a_row_div] @ W_e.T, with
    GATED: W_e rows n (gate) and n_out + n (up), stored silu(gate) * up; MUL_WEIGHT: scaled by
    weights[sorted_id]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + rows)
    row_ok = ids < num_valid
    a_rows = (ids // a_row_div).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
        if IEEE:  # float32 activations: exact products, not TF32
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        if GATED:
            w_up = tl.load(w_base + (cols[None, :] + n_out) * stride_wn + ks[:, None], mask=w_mask,
                           other=0.0)
            if IEEE:
                acc_up += tl.dot(a, w_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, w_up)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        scale = tl.load(weights_ptr + ids, mask=row_ok, other=0.0)
        acc = acc * scale[:, None]
    out_rows = ids.to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: MoeConfig | None = None) -> torch.Tensor:
    """See module docstring. config: the tiles (default: moe_config.select_config)."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    if w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"w2 must be [E, H, I] = {(num_experts, hidden, inter)}, got {tuple(w2.shape)}")
    if num_tokens == 0:
        return torch.zeros_like(x)
    if config is None:
        config = select_config(num_tokens, num_experts, top_k, hidden, inter, x.dtype, x.device)
    x = x.contiguous()
    w13 = w13.contiguous()
    w2 = w2.contiguous()
    weights = topk_weights.to(torch.float32).contiguous().flatten()
    block_m = config.block_m
    sorted_ids, block_expert = sort_by_expert(topk_ids, num_experts, block_m)
    n = num_tokens * top_k
    ieee = x.dtype == torch.float32
    num_blocks = block_expert.numel()
    inter_out = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    y = torch.empty((n, hidden), dtype=x.dtype, device=x.device)
    up = config.gate_up
    _moe_gemm_kernel[(num_blocks, triton.cdiv(inter, up.block_n))](
        x, w13, inter_out, sorted_ids, block_expert, weights, n, inter, hidden, top_k,
        x.stride(0), w13.stride(0), w13.stride(1), inter_out.stride(0),
        GATED=True, MUL_WEIGHT=False, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=up.block_n, BLOCK_K=up.block_k,
        num_warps=up.num_warps, num_stages=up.num_stages)  # fmt: skip
    down = config.down
    _moe_gemm_kernel[(num_blocks, triton.cdiv(hidden, down.block_n))](
        inter_out, w2, y, sorted_ids, block_expert, weights, n, hidden, inter, 1,
        inter_out.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        GATED=False, MUL_WEIGHT=True, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=down.block_n,
        BLOCK_K=down.block_k, num_warps=down.num_warps, num_stages=down.num_stages)  # fmt: skip
    return y.view(num_tokens, top_k, hidden).sum(dim=1)
