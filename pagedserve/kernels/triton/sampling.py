"""Sampling kernels (twin: kernels/reference_sampling.py).

apply_penalties_from_counts: repetition / frequency / presence penalties of N rows in one pass
over the logits, reading each row's token counts straight from the persistent [R, V] tables by
slot (no [N, V] gather copy, no ragged lists):

    grid (N, cdiv(V, BLOCK)): program (n, b) -> columns [b*BLOCK, (b+1)*BLOCK) of row n
        slot = slots[n]
        cnt  = counts[slot, cols]        seen = cnt > 0 | prompt_seen[slot, cols]
        x    = logits[n, cols] * (seen ? (x > 0 ? 1 / rep : rep) : 1)     (APPLY_REP)
        x    = x - freq * cnt - pres * (cnt > 0)

The same ops in the same order as the twin, so results agree to float32 rounding (a compiler may
contract the multiply-subtract into an FMA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _penalties_kernel(logits_ptr, counts_ptr, seen_ptr, slots_ptr, rep_ptr, freq_ptr, pres_ptr,
                      stride_logits, stride_counts, stride_seen, vocab,
                      APPLY_REP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    slot = tl.load(slots_ptr + row).to(tl.int64)
    x = tl.load(logits_ptr + row * stride_logits + cols, mask=mask, other=0.0)
    cnt = tl.load(counts_ptr + slot * stride_counts + cols, mask=mask, other=0).to(tl.float32)
    out_seen = cnt > 0
    if APPLY_REP:
        rep = tl.load(rep_ptr + row)
        prompt = tl.load(seen_ptr + slot * stride_seen + cols, mask=mask, other=0) != 0
        penalty = tl.where(out_seen | prompt, rep, 1.0)
        x = x * tl.where(x > 0, 1.0 / penalty, penalty)
    freq = tl.load(freq_ptr + row)
    pres = tl.load(pres_ptr + row)
    x = x - freq * cnt
    x = x - pres * out_seen.to(tl.float32)
    tl.store(logits_ptr + row * stride_logits + cols, x, mask=mask)


def apply_penalties_from_counts(
    logits: torch.Tensor, counts: torch.Tensor, prompt_seen: torch.Tensor, slots: torch.Tensor,
    repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor, apply_repetition: bool,
) -> None:  # fmt: skip
    """In place on logits [N, V] float32 (row-contiguous); shapes as the twin's."""
    n, vocab = logits.shape
    if n == 0:
        return
    assert logits.stride(1) == 1 and counts.stride(1) == 1 and prompt_seen.stride(1) == 1
    seen = prompt_seen.view(torch.uint8)  # bool -> bytes: the kernel compares with 0
    grid = (n, triton.cdiv(vocab, _BLOCK))
    _penalties_kernel[grid](
        logits, counts, seen, slots, repetition, frequency, presence,
        logits.stride(0), counts.stride(0), seen.stride(0), vocab,
        APPLY_REP=apply_repetition, BLOCK=_BLOCK,
    )  # fmt: skip


# ---------------------------------------------------------------- counter-based seeded draws
# Layout and hash in reference_sampling.py (the twin); grid (S, cdiv(V, BLOCK)).

@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit
def _seeded_exponential_kernel(seeds_ptr, cols_ptr, out_ptr, stride_cols_row, stride_cols_col,
                               stride_out, num_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < num_cols
    cols = tl.load(cols_ptr + row * stride_cols_row + j * stride_cols_col, mask=mask, other=0).to(tl.int64)
    seed = tl.load(seeds_ptr + row).to(tl.int64)
    lo = seed & 0xFFFFFFFF
    hi = (seed >> 32) & 0x7FFFFFFF
    key = _fmix32(lo ^ _fmix32(hi ^ 0x9E3779B9))
    h = _fmix32(((cols * 0x9E3779B9) & 0xFFFFFFFF) ^ key)
    h = _fmix32((h + key) & 0xFFFFFFFF)
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    tl.store(out_ptr + row * stride_out + j, -tl.log(u), mask=mask)


def seeded_exponential(seeds: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """seeds [S] int64, cols [S, M] int64 (any strides: an expanded arange reads one row) ->
    E [S, M] float32 (the twin's bits, up to log's last ulp)."""
    num_rows, num_cols = cols.shape
    out = torch.empty((num_rows, num_cols), dtype=torch.float32, device=seeds.device)
    if num_rows and num_cols:
        grid = (num_rows, triton.cdiv(num_cols, _BLOCK))
        _seeded_exponential_kernel[grid](seeds, cols, out, cols.stride(0), cols.stride(1), out.stride(0),
                                         num_cols, BLOCK=_BLOCK)
    return out
