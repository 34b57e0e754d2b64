"""Sampling kernels against their twins and against the sampler's list / full-sort paths.

The Triton penalty kernel runs under TRITON_INTERPRET=1 on CPU (tests/kernels/conftest.py); the
candidate top-k / top-p must keep exactly the tokens that the full sort keeps.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pagedserve.kernels.reference_sampling import (
    apply_penalties_from_counts,
    full_row_keep,
    redraw_undecided,
    seeded_exponential,
    select_candidates,
    top_k_top_p_candidates,
)
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.sample_draw import exponential_race
from pagedserve.worker.sampler import SamplingMetadata, apply_penalties, top_k_top_p_sort
from pagedserve.worker.sampling_state import SeededDraws

NEG_INF = float("-inf")


def _penalty_case(n: int, vocab: int, rows: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 3, (rows, vocab), generator=g, dtype=torch.int32)
    counts[torch.rand(rows, vocab, generator=g) < 0.7] = 0
    return dict(
        logits=torch.randn(n, vocab, generator=g) * 3,
        counts=counts,
        prompt_seen=torch.rand(rows, vocab, generator=g) < 0.1,
        slots=torch.randperm(rows, generator=g)[:n],
        repetition=1.0 + torch.rand(n, generator=g),
        frequency=torch.rand(n, generator=g) - 0.3,
        presence=torch.rand(n, generator=g),
    )


@pytest.mark.parametrize("apply_repetition", [True, False])
def test_count_penalties_match_the_list_path(apply_repetition: bool) -> None:
    """The device-count twin gives bit for bit what the ragged-list path gives."""
    case = _penalty_case(n=5, vocab=40, rows=7, seed=1)
    got = case["logits"].clone()
    apply_penalties_from_counts(got, case["counts"], case["prompt_seen"], case["slots"], case["repetition"],
                                case["frequency"], case["presence"], apply_repetition)
    outputs, prompts = [], []
    for slot in case["slots"].tolist():
        outputs.append(torch.repeat_interleave(torch.arange(40), case["counts"][slot].long()).tolist())
        prompts.append(torch.nonzero(case["prompt_seen"][slot]).flatten().tolist())
    reps = case["repetition"].tolist() if apply_repetition else [1.0] * 5
    params = [SamplingParams(repetition_penalty=r, frequency_penalty=f, presence_penalty=p)
              for r, f, p in zip(reps, case["frequency"].tolist(), case["presence"].tolist())]
    meta = SamplingMetadata.build(params, prompts, outputs, [None] * 5, [None] * 5, 40, torch.device("cpu"))
    want = case["logits"].clone()
    apply_penalties(want, meta)
    assert torch.equal(got, want)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("apply_repetition", [True, False])
def test_triton_penalties_match_twin(apply_repetition: bool) -> None:
    from pagedserve.kernels.triton.sampling import apply_penalties_from_counts as triton_penalties

    case = _penalty_case(n=3, vocab=2100, rows=4, seed=2)  # two column blocks, the second partial
    want, got = case["logits"].clone(), case["logits"].clone()
    args = (case["counts"], case["prompt_seen"], case["slots"], case["repetition"], case["frequency"],
            case["presence"], apply_repetition)
    apply_penalties_from_counts(want, *args)
    triton_penalties(got, *args)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _kept(x: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > NEG_INF).flatten().tolist()) for row in x]


@pytest.mark.parametrize("with_top_k", [True, False])
def test_candidates_keep_what_the_full_sort_keeps(with_top_k: bool) -> None:
    """V = 3000 with 16 candidates: peaked rows are decided by the candidates, flat ones and
    large k fall back to the sort; the kept sets and the kept values equal the full sort's."""
    g = torch.Generator().manual_seed(3)
    n, vocab = 48, 3000
    scale = torch.tensor([8.0, 4.0, 1.0, 0.1]).repeat(n // 4)[:, None]  # peaked ... flat
    logits = torch.randn(n, vocab, generator=g) * scale
    top_k = torch.randint(0, 30, (n,), generator=g) if with_top_k else None
    if top_k is not None:
        top_k[::7] = 0
    top_p = torch.rand(n, generator=g).clamp(0.05, 0.99)
    top_p[::5] = 1.0
    fallback_rows: list[int] = []

    def spy(x: torch.Tensor, k: torch.Tensor | None, kmax: int, p: torch.Tensor) -> torch.Tensor:
        fallback_rows.append(x.shape[0])
        return top_k_top_p_sort(x, k, kmax, p)

    kmax = int(top_k.max()) if top_k is not None else 0
    got = top_k_top_p_candidates(logits.clone(), top_k, kmax, top_p, spy, num_candidates=16)
    want = top_k_top_p_sort(logits.clone(), top_k, kmax, top_p)
    assert _kept(got) == _kept(want)
    assert torch.equal(got, want)
    assert len(fallback_rows) == 1 and 0 < fallback_rows[0] < n  # both paths ran


def test_candidates_keep_ties_at_the_kth_value() -> None:
    """top_k = 2 where 40 logits tie at the 2nd value: all of them stay (as the full sort keeps
    them), although they do not fit among the 16 candidates."""
    logits = torch.full((2, 500), -5.0)
    logits[:, 0] = 3.0
    logits[:, 1:41] = 1.0
    top_k = torch.tensor([2, 2])
    top_p = torch.tensor([0.999, 1.0])
    got = top_k_top_p_candidates(logits.clone(), top_k, 2, top_p, top_k_top_p_sort, num_candidates=16)
    want = top_k_top_p_sort(logits.clone(), top_k, 2, top_p)
    assert _kept(got) == _kept(want) == [set(range(41))] * 2


SEEDS = torch.tensor([0, 1, 2, 2**40 + 5, 2**63 - 1])


def test_seeded_exponential_is_exponential_and_batch_independent() -> None:
    e = seeded_exponential(SEEDS, torch.arange(20000).expand(5, -1))
    assert e.shape == (5, 20000) and bool((e > 0).all()) and bool(torch.isfinite(e).all())
    for row in e:  # Exp(1): mean 1, P(E > 1) = 1/e; 20000 draws -> ~5 sigma bounds
        assert abs(float(row.mean()) - 1.0) < 0.04
        assert abs(float((row > 1).double().mean()) - 0.3679) < 0.02
    assert torch.equal(seeded_exponential(SEEDS[3:4], torch.arange(20000)[None])[0], e[3])  # alone == batched
    cols = torch.tensor([[5, 19999, 7], [0, 3, 2]])  # a few columns: the same values as the full row
    assert torch.equal(seeded_exponential(SEEDS[3:5], cols), torch.stack([e[3, cols[0]], e[4, cols[1]]]))
    assert not torch.equal(e[1], e[2])  # neighbouring seeds: different streams
    assert float(torch.corrcoef(e[1:3])[0, 1]).__abs__() < 0.05


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_seeded_exponential_matches_twin() -> None:
    from pagedserve.kernels.triton.sampling import seeded_exponential as triton_seeded

    full = torch.arange(2100).expand(5, -1)  # stride 0 over rows, two column blocks
    torch.testing.assert_close(triton_seeded(SEEDS, full), seeded_exponential(SEEDS, full), rtol=1e-6, atol=1e-6)
    some = torch.randint(0, 2100, (5, 300), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(triton_seeded(SEEDS, some), seeded_exponential(SEEDS, some), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_match_twins_at_real_shapes_on_cuda() -> None:
    """[256, 128256] (Llama 3's vocabulary): compiled kernels vs twins, and the candidates vs the
    full sort on the GPU."""
    from pagedserve.kernels.triton.sampling import apply_penalties_from_counts as triton_penalties
    from pagedserve.kernels.triton.sampling import seeded_exponential as triton_seeded

    cuda = torch.device("cuda")
    case = {k: v.to(cuda) for k, v in _penalty_case(n=256, vocab=128256, rows=300, seed=5).items()}
    want, got = case["logits"].clone(), case["logits"].clone()
    args = (case["counts"], case["prompt_seen"], case["slots"], case["repetition"], case["frequency"],
            case["presence"], True)
    apply_penalties_from_counts(want, *args)
    triton_penalties(got, *args)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    seeds = torch.arange(256, device=cuda) * 7919
    cols = torch.arange(128256, device=cuda).expand(256, -1)
    torch.testing.assert_close(triton_seeded(seeds, cols), seeded_exponential(seeds, cols), rtol=1e-6, atol=1e-6)
    logits = case["logits"] / 0.7
    top_k = torch.full((256,), 50, device=cuda)
    top_p = torch.full((256,), 0.9, device=cuda)
    got = top_k_top_p_candidates(logits.clone(), top_k, 50, top_p, top_k_top_p_sort)
    assert _kept(got) == _kept(top_k_top_p_sort(logits.clone(), top_k, 50, top_p))


def test_candidates_with_fewer_finite_logits_than_k() -> None:
    """A grammar mask left 5 tokens and top_k is 20: the candidates decide the row, keeping the 5."""
    logits = torch.full((1, 1000), NEG_INF)
    logits[0, [3, 70, 500, 501, 999]] = torch.tensor([1.0, 2.0, 0.5, -1.0, 3.0])
    cands = select_candidates(logits, torch.tensor([20]), 20, None, num_candidates=32)
    assert bool(cands.decided.all())
    kept = set(cands.idx[cands.vals > NEG_INF].tolist())
    assert kept == {3, 70, 500, 501, 999}


def _redraw_case(n: int, vocab: int, seed: int) -> dict:
    """Peaked to flat rows, top_k off / small / tied at the k-th value, top_p off / 0.5 / 0.95,
    a few -inf (masked) tokens, every other row undecided."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([6.0, 2.0, 0.5, 0.05]).repeat(n)[:n, None]
    logits = torch.randn(n, vocab, generator=g) * scale
    logits[0, 100:140] = float(logits[0].max()) + 1.0  # 40 ties at the top
    logits[:, 7::97] = NEG_INF
    top_k = torch.tensor([2, 0, 30, 5, 0, 300, 1, 0] * n)[:n]
    # row 0 keeps top_p off: among tokens tied at the top-p boundary the sort keeps some by
    # position, the kernel all or none (both are the rule; only ties at the k-th value are fixed)
    top_p = torch.tensor([1.0, 0.5, 1.0, 0.9, 0.95, 0.5, 0.7, 0.9] * n)[:n]
    undecided = torch.ones(n, dtype=torch.bool)
    undecided[3::4] = False
    seeds = torch.randint(0, 1 << 62, (n,), generator=g)
    return dict(logits=logits, top_k=top_k, top_p=top_p, undecided=undecided, seeds=seeds)


def test_full_row_keep_keeps_what_the_full_sort_keeps() -> None:
    case = _redraw_case(n=16, vocab=3000, seed=6)
    for top_k in (case["top_k"], None):
        for top_p in (case["top_p"], None):
            kept = full_row_keep(case["logits"], top_k, top_p)
            sorted_p = case["top_p"] if top_p is None else top_p  # the sort needs a top_p: all 1 is off
            want = top_k_top_p_sort(case["logits"].clone(), top_k, 0, sorted_p if top_p is not None
                                    else torch.ones_like(sorted_p))
            assert _kept(case["logits"].masked_fill(~kept, NEG_INF)) == _kept(want)


def test_redraw_is_the_exponential_race_over_the_full_sorts_kept_set() -> None:
    """Undecided rows draw what the sampler's full-row path draws with the same counter noise;
    decided rows keep their token."""
    case = _redraw_case(n=16, vocab=3000, seed=7)
    sampled = torch.full((16,), -1, dtype=torch.int64)
    redraw_undecided(sampled, case["logits"], case["undecided"], case["top_k"], case["top_p"], case["seeds"])
    kept = top_k_top_p_sort(case["logits"].clone(), case["top_k"], 0, case["top_p"])
    seeded = SeededDraws(torch.arange(16), case["seeds"], 16, seeded_exponential)
    want = exponential_race(kept.softmax(dim=-1), {}, seeded)
    assert torch.equal(sampled[case["undecided"]], want[case["undecided"]])
    assert bool((sampled[~case["undecided"]] == -1).all())
    assert int(sampled[6]) == int(case["logits"][6].argmax())  # top_k 1 is greedy


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("options", ["both", "top_k", "top_p", "neither"])
def test_triton_redraw_matches_twin(options: str) -> None:
    """Two column blocks (the second partial), every kind of row; decided rows untouched."""
    from pagedserve.kernels.triton.sampling import redraw_undecided as triton_redraw

    case = _redraw_case(n=8, vocab=2500, seed=8)
    top_k = case["top_k"] if options in ("both", "top_k") else None
    top_p = case["top_p"] if options in ("both", "top_p") else None
    want = torch.full((8,), -1, dtype=torch.int64)
    got = want.clone()
    args = (case["logits"], case["undecided"], top_k, top_p, case["seeds"])
    redraw_undecided(want, *args)
    triton_redraw(got, *args)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_redraw_and_the_draw_on_cuda_without_a_host_sync() -> None:
    """[256, 128256]: the compiled redraw equals its twin on every kind of row; and the sampler's
    device draw of realistic rows (top-k 50, top-p 0.9, penalties, seeds) and of top-p-only flat
    rows queues without one host sync (torch's sync debug mode raises on any)."""
    from pagedserve.kernels.triton.sampling import redraw_undecided as triton_redraw
    from pagedserve.worker.sampler import Sampler
    from pagedserve.worker.sampling_state import choose_seeded_kernel

    cuda = torch.device("cuda")
    case = {k: v.to(cuda) for k, v in _redraw_case(n=256, vocab=128256, seed=9).items()}
    want = torch.full((256,), -1, dtype=torch.int64, device=cuda)
    got = want.clone()
    args = (case["logits"], case["undecided"], case["top_k"], case["top_p"], case["seeds"])
    redraw_undecided(want, *args)
    triton_redraw(got, *args)
    assert torch.equal(got, want)

    n, vocab = 64, 128256
    logits = torch.randn(n, vocab, device=cuda) * 4
    seeded = SeededDraws(torch.arange(n, device=cuda), torch.arange(n, device=cuda) * 31, n,
                         choose_seeded_kernel(cuda))
    for params in (SamplingParams(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=1),
                   SamplingParams(temperature=1.0, top_p=0.9, seed=1)):
        meta = SamplingMetadata.build([params] * n, [[1, 2, 3]] * n, [[4, 5]] * n, [None] * n, [None] * n,
                                      vocab, cuda, seeded=seeded)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampled = Sampler().draw(logits.clone(), meta)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert sampled.shape == (n,) and bool(((sampled >= 0) & (sampled < vocab)).all())
