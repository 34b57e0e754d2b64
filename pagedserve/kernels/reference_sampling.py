"""Plain-torch sampling kernels: the CPU path and the oracle of kernels/triton/sampling.py.

Two pieces of the sampler that must not cost a pass per Python list or a full vocabulary sort:

1. Penalties from persistent per-request token counts (worker/sampling_state.py keeps them):

       counts     [R, V] int32   output tokens of the request holding slot r, counted
       prompt_seen[R, V] bool    tokens of its prompt
       slots      [N]    int64   the slot of sampled row n (any valid slot for rows without a
                                 penalty: their penalties are neutral, 1 / 0 / 0)

       seen  = counts[slot] > 0 | prompt_seen[slot]
       x    *= seen ? (x > 0 ? 1 / rep : rep) : 1          (only when apply_repetition)
       x    -= freq * counts[slot]
       x    -= pres * (counts[slot] > 0)

   exactly the ops of sampler.apply_penalties on the ragged lists, in the same order.

2. top-k / top-p without sorting the vocabulary (top_k_top_p_candidates): both keep a prefix of
   the row in descending logit order, and for realistic requests (top_k 50, or top_p 0.9 of a
   peaked distribution) that prefix is short. So take the C largest logits (torch.topk: a
   selection, not a sort), decide the kept set on those C candidates, and fall back to the full
   sort only for the rows whose kept set may reach past them:

       vals, idx = topk(logits, C)                         [N, C] descending
       top-k threshold  kth = vals[k - 1] (ties kept), mask logits < kth
       p_j   = exp(vals_j - logsumexp(masked row))        the full row's probabilities
       A_j   = tail + sum_{i >= j} p_i                     ascending mass up to candidate j
       keep candidate j  iff  A_j > 1 - top_p              (the full sort's rule; j = 0 always)

   A row is decided by its candidates when its top-k set lies within them (k <= C and at most C
   logits >= kth) or when the candidates' mass reaches top_p (then every later token's ascending
   mass is at most 1 - top_p and it is dropped). The kept set is the same as the full sort's; only float rounding
   at the exact boundary can differ (the full sort's float32 cumsum over V entries is the less
   exact of the two). Deciding needs no answer on the host: every quantity is a tensor.

3. The undecided rows redrawn over the full row (redraw_undecided), without a host sync on the
   GPU (kernels/triton/sampling.py: one program per row, a decided row's program exits at once):

       T_k  = the k-th largest logit (ties kept)                     k = 0: no top-k
       Z    = sum over x >= T_k of exp(x - max)
       keep x  iff  x >= T_k  and  (mass of the kept tokens strictly above x) / Z < top_p
       token = argmax over kept of  x - log E[t],  E[t] = the counter hash of (seed, t)

   The keep rule is the full sort's (drop j when the ascending mass up to j is at most
   1 - top_p) written from the top. The kernel finds T_k and the top-p threshold by bisection on
   the logits' order-preserving integer keys; this twin sorts. Every row gets a seed: a seeded
   row its step seed, the others one drawn from torch's generator, so a seeded row draws the same
   noise per token on the candidates (candidate_race) and over the full row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_CANDIDATES = 256  # C: enough for top_k <= 256 and most top_p prefixes at temperature <= 1


def apply_penalties_from_counts(
    logits: Tensor, counts: Tensor, prompt_seen: Tensor, slots: Tensor, repetition: Tensor,
    frequency: Tensor, presence: Tensor, apply_repetition: bool,
) -> None:  # fmt: skip
    """In place on logits [N, V] float32; counts [R, V] int32, prompt_seen [R, V] bool, slots [N]
    int64, penalties [N] float32 (layout in the module docstring).

    Only the (row, token) pairs seen in the prompt or output change, so the formula runs on those
    M pairs alone: an unseen token gets x * 1 - freq * 0 - pres * 0 = x, bit for bit."""
    out_counts = counts.index_select(0, slots)  # [N, V] int32
    seen = out_counts != 0
    if apply_repetition:
        seen |= prompt_seen.index_select(0, slots)
    rows, cols = seen.nonzero(as_tuple=True)  # [M] each
    x = logits[rows, cols]
    cnt = out_counts[rows, cols].to(torch.float32)
    if apply_repetition:
        penalty = repetition[rows]
        x = x * torch.where(x > 0, penalty.reciprocal(), penalty)
    x = x - frequency[rows] * cnt
    x = x - presence[rows] * (cnt > 0)
    logits[rows, cols] = x


SortFallback = Callable[[Tensor, Tensor | None, int, Tensor], Tensor]


@dataclass(slots=True)
class Candidates:
    """The C largest logits of each row and the top-k / top-p decision on them."""

    vals: Tensor  # [N, C] float32 descending; the dropped ones -inf
    idx: Tensor  # [N, C] int64 their token ids
    decided: Tensor  # [N] bool: the row's kept set lies within its candidates
    plain: Tensor  # [N] bool: neither top-k nor top-p (the row keeps everything)


def select_candidates(
    logits: Tensor, top_k: Tensor | None, max_top_k: int, top_p: Tensor | None,
    num_candidates: int = DEFAULT_CANDIDATES, top_k_everywhere: bool = False,
) -> Candidates:  # fmt: skip
    """logits [N, V] float32 (not modified), top_k [N] int64 (0 = off) or None, top_p [N]
    float32 (1 = off) or None. The decision rule is in the module docstring. No host sync.

    top_k_everywhere: the caller knows every row that counts has top_k > 0, so no row needs the
    full row's normaliser (one pass over [N, V] saved). A row with top_k whose top-k set reaches
    past the candidates (ties at the k-th value) is left undecided."""
    n, vocab = logits.shape
    neg_inf = float("-inf")
    c = min(vocab, max(max_top_k, num_candidates))
    vals, idx = logits.topk(c, dim=-1)  # [N, C] descending: a selection, not a sort
    k = torch.full((n,), vocab, dtype=torch.int64, device=logits.device)
    if top_k is not None:
        k = torch.where(top_k == 0, k, top_k)
    has_k = k <= c
    kth = vals.gather(1, (k.clamp(max=c) - 1)[:, None])  # [N, 1] the k-th largest
    threshold = kth.masked_fill(~has_k[:, None], neg_inf)
    cand = vals.masked_fill(vals < threshold, neg_inf)
    if c == vocab:
        within = torch.ones_like(has_k)
    else:  # no logit outside the candidates reaches the k-th value (ties included), or the
        # k-th is -inf (a grammar left fewer than k tokens: those outside have probability 0)
        within = has_k & ((vals[:, -1] < kth[:, 0]) | torch.isneginf(kth[:, 0]))
    # [N, 1] the normaliser: of the top-k set where it lies within the candidates, of the full
    # row where no top-k applies (threshold -inf); wrong only for rows left undecided below
    if top_k is None:
        lse = logits.logsumexp(dim=-1, keepdim=True)
    elif top_k_everywhere:
        lse = cand.logsumexp(dim=-1, keepdim=True)
    else:
        lse = torch.where(has_k[:, None], cand.logsumexp(dim=-1, keepdim=True),
                          logits.logsumexp(dim=-1, keepdim=True))
    use_p = top_p < 1.0 if top_p is not None else torch.zeros_like(has_k)
    p = (cand - lse).exp()  # [N, C] the full row's probabilities of the candidates
    mass = p.sum(dim=-1)
    decided = within
    if top_p is not None:
        # The full sort's rule in its own float32 terms: drop j when the ascending cumulative
        # mass up to j (the tail below the candidates, then the candidates from the least likely)
        # is at most 1 - top_p; the tail is exactly 0 when the candidates are the whole row.
        tail = (1.0 - mass[:, None]).clamp_min(0.0) if c < vocab else torch.zeros_like(lse)
        ascending = p.flip(-1).cumsum(dim=-1).flip(-1) + tail  # [N, C]
        keep = (ascending > (1.0 - top_p)[:, None]) | ~use_p[:, None]
        keep[:, 0] = True  # the most likely token always stays
        cand = cand.masked_fill(~keep, neg_inf)
        decided = within | (~has_k & use_p & (mass >= top_p))
    return Candidates(cand, idx, decided, ~use_p & ~has_k)


def top_k_top_p_candidates(
    logits: Tensor, top_k: Tensor | None, max_top_k: int, top_p: Tensor, full_sort: SortFallback,
    num_candidates: int = DEFAULT_CANDIDATES,
) -> Tensor:  # fmt: skip
    """The full-row form: logits [N, V] -> a new [N, V] with every dropped token at -inf.
    `full_sort(logits_rows, top_k_rows, max_top_k, top_p_rows)` runs only on undecided rows."""
    cands = select_candidates(logits, top_k, max_top_k, top_p, num_candidates)
    out = torch.full_like(logits, float("-inf")).scatter_(1, cands.idx, cands.vals)
    undecided = ~cands.decided
    if bool(undecided.any()):  # one host sync; rare for realistic distributions
        copy = torch.nonzero(undecided & cands.plain).flatten()
        out[copy] = logits[copy]
        rows = torch.nonzero(undecided & ~cands.plain).flatten()
        if rows.numel():
            rows_k = None if top_k is None else top_k[rows]
            out[rows] = full_sort(logits[rows], rows_k, max_top_k, top_p[rows])
    return out


def row_seeds(num_rows: int, seeded_rows: Tensor | None, seeded_seeds: Tensor | None,
              device: torch.device) -> Tensor:
    """[N] int64 non-negative seeds of one step's counter-hash noise: the seeded rows' step
    seeds, a fresh draw from torch's default generator (on `device`) for every other row."""
    seeds = torch.randint(0, 1 << 62, (num_rows,), dtype=torch.int64, device=device)
    if seeded_rows is not None and seeded_seeds is not None:
        seeds.index_copy_(0, seeded_rows, seeded_seeds)
    return seeds


def full_row_keep(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """[N, V] bool: the tokens the full sort keeps (the rule of part 3 of the module docstring).
    logits [N, V] float32; top_k [N] int64 (0 = off) or None; top_p [N] float32 or None."""
    n, vocab = logits.shape
    keep = torch.ones_like(logits, dtype=torch.bool)
    sorted_desc, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        k = torch.where(top_k == 0, vocab, top_k)
        kth = sorted_desc.gather(1, (k - 1)[:, None])  # [N, 1]
        keep &= logits >= kth
        sorted_desc = sorted_desc.masked_fill(sorted_desc < kth, float("-inf"))
    if top_p is not None:
        mass = sorted_desc.softmax(dim=-1)  # [N, V] descending probabilities of the top-k set
        above = mass.cumsum(dim=-1) - mass  # the mass strictly before each position
        keep_sorted = (above < top_p[:, None]) | (top_p >= 1.0)[:, None]
        keep_sorted[:, 0] = True
        keep &= torch.zeros_like(keep).scatter_(1, order, keep_sorted)
    return keep


def redraw_undecided(sampled: Tensor, logits: Tensor, undecided: Tensor, top_k: Tensor | None,
                     top_p: Tensor | None, seeds: Tensor) -> None:
    """In place on sampled [N] int64: each undecided row [N] bool redrawn over its full row
    (logits [N, V] float32, not modified) with the noise of seeds [N] (row_seeds). The host
    sync (which rows) is free on the CPU; the Triton kernel needs none."""
    rows = torch.nonzero(undecided).flatten()
    if rows.numel() == 0:
        return
    x = logits.index_select(0, rows)
    keep = full_row_keep(x, None if top_k is None else top_k[rows], None if top_p is None else top_p[rows])
    noise = seeded_exponential(seeds[rows], torch.arange(x.shape[1], device=x.device).expand(rows.numel(), -1))
    score = (x - noise.log()).masked_fill(~keep, float("-inf"))
    sampled.index_copy_(0, rows, score.argmax(dim=-1))


# ---------------------------------------------------------------- counter-based seeded draws
#
# A seeded row's exponential noise E[t] for token t is a pure function of (step seed, t), so all
# seeded rows of a step are drawn in one batched pass instead of one generator call per row, and
# only for the tokens that can be drawn (the candidates) when the row is decided by them:
#
#     lo, hi = low 32 bits of seed, next 31 bits
#     key    = fmix32(lo ^ fmix32(hi ^ GOLDEN))
#     h      = fmix32(fmix32((t * GOLDEN) mod 2^32 ^ key) + key mod 2^32)
#     u      = (h >> 8 + 0.5) / 2^24                          in (0, 1), 24 bits
#     E[t]   = -log(u)                                        ~ Exponential(1)
#
# fmix32 is MurmurHash3's finaliser (a bijection on 32 bits with full avalanche). All arithmetic
# is on int64 holding 32-bit values, masked after each multiply (a wrapped int64 product keeps its
# low 32 bits), so this twin and the Triton kernel compute the same bits.

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def seeded_exponential(seeds: Tensor, cols: Tensor) -> Tensor:
    """seeds [S] int64 (non-negative), cols [S, M] int64 token ids (a whole row: an expanded
    arange) -> E [S, M] float32, E ~ Exponential(1) i.i.d. per (seed, token); the same seed gives
    the same noise for a token whatever else is in the batch and whichever columns are asked."""
    lo = (seeds & MASK32)[:, None]
    hi = ((seeds >> 32) & 0x7FFFFFFF)[:, None]
    key = _fmix32(lo ^ _fmix32(hi ^ GOLDEN))  # [S, 1]
    h = _fmix32(((cols * GOLDEN) & MASK32) ^ key)
    h = _fmix32((h + key) & MASK32)  # [S, V]
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(u)
