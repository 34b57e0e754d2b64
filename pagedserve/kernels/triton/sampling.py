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
