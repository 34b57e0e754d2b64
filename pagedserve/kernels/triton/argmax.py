"""Row-wise argmax over the vocabulary (twin: reference.argmax_rows = torch.argmax(dim=-1)).

Greedy decoding needs argmax(logits [N, V]) with V ~ 128k. torch's reduction runs one row on one
block (27 us for V = 128256 on an H200); here a row is split over V / CHUNK programs:

    stage 1, grid (N, P): program (n, p) -> (max, first index of the max) of columns
                          [p*CHUNK, (p+1)*CHUNK) of row n         -> part_val, part_idx [N, P]
    stage 2, grid (N,):   the first part holding the row's max    -> out [N] int64

Ties go to the lowest index in both stages (parts are ordered by column), as torch.argmax does.
NaN logits are not expected (the sampler never produces them) and are not given torch's
"NaN is the max" meaning.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK = 4096


@triton.jit
def _argmax_part_kernel(x_ptr, part_val_ptr, part_idx_ptr, stride_x, num_cols, num_parts,
                        CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    cols = part * CHUNK + tl.arange(0, CHUNK)
    vals = tl.load(x_ptr + row * stride_x + cols, mask=cols < num_cols, other=float("-inf"))
    vals = vals.to(tl.float32)
    best = tl.max(vals, axis=0)
    # first column holding the max: smallest index among the maxima
    idx = tl.min(tl.where(vals == best, cols, num_cols), axis=0)
    idx = tl.minimum(idx, num_cols - 1)  # an all -inf chunk: any index, stage 2 skips it
    tl.store(part_val_ptr + row * num_parts + part, best)
    tl.store(part_idx_ptr + row * num_parts + part, idx)


@triton.jit
def _argmax_reduce_kernel(part_val_ptr, part_idx_ptr, out_ptr, num_parts, PARTS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, PARTS_PAD)
    mask = parts < num_parts
    vals = tl.load(part_val_ptr + row * num_parts + parts, mask=mask, other=float("-inf"))
    idxs = tl.load(part_idx_ptr + row * num_parts + parts, mask=mask, other=0)
    best = tl.max(vals, axis=0)
    first = tl.min(tl.where(mask & (vals == best), parts, PARTS_PAD), axis=0)
    first = tl.minimum(first, num_parts - 1)  # all -inf row: part 0 -> index 0, as torch
    winner = tl.sum(tl.where(parts == first, idxs, 0), axis=0)
    tl.store(out_ptr + row, winner.to(tl.int64))


def argmax_rows(x: torch.Tensor, out: torch.Tensor | None = None, chunk: int = _CHUNK) -> torch.Tensor:
    """x [N, V] (float32/bf16/fp16, last dim contiguous) -> [N] int64 index of each row's max."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be a [N, V] tensor contiguous in V, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("argmax over an empty vocabulary")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    num_rows, num_cols = x.shape
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    elif out.shape != (num_rows,) or out.dtype != torch.int64:
        raise ValueError(f"out must be int64 [{num_rows}], got {out.dtype} {tuple(out.shape)}")
    if num_rows == 0:
        return out
    num_parts = triton.cdiv(num_cols, chunk)
    part_val = torch.empty((num_rows, num_parts), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((num_rows, num_parts), dtype=torch.int64, device=x.device)
    _argmax_part_kernel[(num_rows, num_parts)](
        x, part_val, part_idx, x.stride(0), num_cols, num_parts, CHUNK=chunk, num_warps=8)
    _argmax_reduce_kernel[(num_rows,)](
        part_val, part_idx, out, num_parts, PARTS_PAD=max(16, triton.next_power_of_2(num_parts)),
        num_warps=1)
    return out
