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

redraw_undecided: the rows the candidates could not decide, redrawn over the full row with no
host sync (the rule is in reference_sampling.py, part 3):

    grid (N,): program n returns at once unless undecided[n]; otherwise, over [V] in BLOCKs,
        key(x)  = the float's bits as int32, negatives' low 31 bits flipped (order-preserving)
        T_k     = the largest T with #{key >= T} >= k          32 bisection steps on the int range
        Z       = sum over key >= T_k of exp(x - max)
        T_p     = the least T >= T_k with sum over key > T of exp(x - max) / Z < top_p   (32 steps)
        token   = argmax over key >= max(T_k, T_p) of x - log E[t]

An undecided row costs about 67 passes over its row (about 34 without top-k); a decided one a
load of its flag. The twin sorts instead of bisecting: the same kept set up to float rounding
at the exact top-p boundary.
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


# ---------------------------------------------------------------- full-row redraw of undecided rows

_REDRAW_BLOCK = 2048


@triton.jit
def _ordered_key(x):
    """float32 -> int64 whose order is the floats' order (-inf lowest)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _redraw_kernel(sampled_ptr, logits_ptr, undecided_ptr, top_k_ptr, top_p_ptr, seeds_ptr,
                   stride_logits, vocab, HAS_K: tl.constexpr, HAS_P: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(undecided_ptr + row) != 0:
        base = logits_ptr + row * stride_logits
        offs = tl.arange(0, BLOCK)
        # the row's largest logit
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            best = tl.maximum(best, tl.load(base + cols, mask=cols < vocab, other=float("-inf")))
        top = tl.max(best, axis=0)
        top_key = _ordered_key(top)
        # T_k: bisection keeps #{key >= lo} >= k; the k-th largest key when it ends
        lo = tl.full((), -2147483648, tl.int64)
        if HAS_K:
            k = tl.load(top_k_ptr + row)
            if k > 0:
                hi = top_key
                for _ in range(32):
                    mid = lo + (hi - lo + 1) // 2
                    count = tl.zeros((BLOCK,), tl.int32)
                    for start in range(0, vocab, BLOCK):
                        cols = start + offs
                        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf"))
                        count += ((_ordered_key(x) >= mid) & (cols < vocab)).to(tl.int32)
                    enough = tl.sum(count, axis=0) >= k
                    lo = tl.where(enough, mid, lo)
                    hi = tl.where(enough, hi, mid - 1)
        keep_from = lo
        if HAS_P:
            p = tl.load(top_p_ptr + row)
            if p < 1.0:
                z = tl.zeros((BLOCK,), tl.float32)
                for start in range(0, vocab, BLOCK):
                    cols = start + offs
                    x = tl.load(base + cols, mask=cols < vocab, other=float("-inf"))
                    z += tl.where(_ordered_key(x) >= lo, tl.exp(x - top), 0.0)
                total = tl.sum(z, axis=0)
                # the least T in [T_k, top_key] whose strictly-higher mass is below top_p
                hi = top_key
                for _ in range(32):
                    mid = lo + (hi - lo) // 2
                    above = tl.zeros((BLOCK,), tl.float32)
                    for start in range(0, vocab, BLOCK):
                        cols = start + offs
                        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf"))
                        above += tl.where(_ordered_key(x) > mid, tl.exp(x - top), 0.0)
                    small = tl.sum(above, axis=0) / total < p
                    hi = tl.where(small, mid, hi)
                    lo = tl.where(small, lo, mid + 1)
                keep_from = lo
        # the race: the counter hash of (seed, token), as _seeded_exponential_kernel
        seed = tl.load(seeds_ptr + row).to(tl.int64)
        key = _fmix32((seed & 0xFFFFFFFF) ^ _fmix32(((seed >> 32) & 0x7FFFFFFF) ^ 0x9E3779B9))
        win_score = tl.full((), float("-inf"), tl.float32)
        win_token = tl.full((), 0, tl.int64)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            inside = cols < vocab
            x = tl.load(base + cols, mask=inside, other=float("-inf"))
            h = _fmix32(((cols.to(tl.int64) * 0x9E3779B9) & 0xFFFFFFFF) ^ key)
            h = _fmix32((h + key) & 0xFFFFFFFF)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = tl.where(inside & (_ordered_key(x) >= keep_from), x - tl.log(-tl.log(u)), float("-inf"))
            block_best = tl.max(score, axis=0)
            block_token = tl.argmax(score, axis=0).to(tl.int64) + start
            better = block_best > win_score  # strict: the first of equal scores wins, as argmax
            win_token = tl.where(better, block_token, win_token)
            win_score = tl.where(better, block_best, win_score)
        tl.store(sampled_ptr + row, win_token)


def redraw_undecided(sampled: torch.Tensor, logits: torch.Tensor, undecided: torch.Tensor,
                     top_k: torch.Tensor | None, top_p: torch.Tensor | None, seeds: torch.Tensor) -> None:
    """In place on sampled [N] int64; logits [N, V] float32 (row-contiguous); undecided [N]
    bool; top_k [N] int64 / top_p [N] float32 or None; seeds [N] int64. Shapes as the twin's."""
    n, vocab = logits.shape
    if n == 0:
        return
    assert logits.stride(1) == 1
    flags = undecided.view(torch.uint8)
    _redraw_kernel[(n,)](
        sampled, logits, flags, top_k if top_k is not None else seeds,
        top_p if top_p is not None else logits, seeds, logits.stride(0), vocab,
        HAS_K=top_k is not None, HAS_P=top_p is not None, BLOCK=_REDRAW_BLOCK, num_warps=8,
    )  # fmt: skip
