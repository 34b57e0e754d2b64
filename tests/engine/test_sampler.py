"""Sampler: every SamplingParams field changes what is sampled, exactly as specified.

Distribution tests sample one row many times in a single batch (fixed torch seed, so they are
deterministic) and compare frequencies with the exact target distribution (tolerance 0.04 is
about 5 standard deviations at 4000 samples).
"""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.sampler import (
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    apply_penalties,
    apply_top_k_top_p,
    compute_prompt_logprobs,
    make_generator,
)

CPU = torch.device("cpu")
V = 8
NUM = 4000
TOL = 0.04
# probabilities 0.5, 0.3, 0.15, 0.05 and four tokens of (almost) zero mass
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05, 1e-12, 1e-12, 1e-12, 1e-12])
LOGITS = PROBS.log()


def build(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    gens: list[torch.Generator | None] | None = None,
    eos: list[int | None] | None = None,
    vocab: int = V,
    device: torch.device = CPU,
) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        gens if gens is not None else [None] * n,
        eos if eos is not None else [None] * n,
        vocab,
        device,
    )


def sample(params: list[SamplingParams], logits: torch.Tensor, **kw: object) -> SamplerOutput:
    return Sampler()(logits.clone(), build(params, **kw))  # type: ignore[arg-type]


def freqs(params: SamplingParams, row: torch.Tensor = LOGITS, **kw: object) -> torch.Tensor:
    torch.manual_seed(0)
    n = kw.pop("num", NUM)
    assert isinstance(n, int)
    out = sample([params] * n, row.expand(n, -1).contiguous(), **kw)
    return torch.bincount(torch.tensor(out.sampled_token_ids), minlength=row.shape[-1]).double() / n


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a.double() - b.double()).abs().max() < TOL)


def renorm(keep: list[int]) -> torch.Tensor:
    p = torch.zeros(V, dtype=torch.float64)
    p[keep] = PROBS[keep].double()
    return p / p.sum()


def test_plain_random_sampling_follows_softmax() -> None:
    assert close(freqs(SamplingParams()), PROBS)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0])
    target = (logits / temperature).softmax(-1)
    assert not close(target, logits.softmax(-1))  # the test could fail if temperature were ignored
    assert close(freqs(SamplingParams(temperature=temperature), logits), target)


def test_greedy_is_argmax_and_mixes_with_random_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, V)
    params = [
        SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=5.0) for i in range(64)
    ]
    out = sample(params, logits)
    argmax = logits.argmax(-1).tolist()
    assert all(out.sampled_token_ids[i] == argmax[i] for i in range(1, 64, 2))
    assert any(out.sampled_token_ids[i] != argmax[i] for i in range(0, 64, 2))
    assert sample([SamplingParams(temperature=0.0)] * 64, logits).sampled_token_ids == argmax


def test_top_k() -> None:
    assert close(freqs(SamplingParams(top_k=2)), renorm([0, 1]))
    assert close(freqs(SamplingParams(top_k=3)), renorm([0, 1, 2]))
    assert build([SamplingParams(top_k=V)]).top_k is None  # k >= vocab keeps everything


def test_top_p() -> None:
    # ascending mass 0.05, 0.2, 0.5: top_p=0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8); top_p=0.5 keeps {0}
    assert close(freqs(SamplingParams(top_p=0.7)), renorm([0, 1]))
    assert close(freqs(SamplingParams(top_p=0.5)), renorm([0]))
    assert close(freqs(SamplingParams(top_p=0.9)), renorm([0, 1, 2]))
    # a tiny top_p still keeps the most likely token (float cumsum may fall short of 1 - top_p)
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 4
    out = sample([SamplingParams(top_p=1e-9)] * 64, logits, vocab=1000)
    assert out.sampled_token_ids == logits.argmax(-1).tolist()


def test_min_p() -> None:
    # threshold min_p * 0.5: 0.2 -> 0.1 drops the 0.05 token; 0.5 -> 0.25 keeps {0, 1}
    assert close(freqs(SamplingParams(min_p=0.2)), renorm([0, 1, 2]))
    assert close(freqs(SamplingParams(min_p=0.5)), renorm([0, 1]))


def test_top_k_and_top_p_together() -> None:
    # top-3 renormalised: 0.526, 0.316, 0.158; top_p=0.8 then drops token 2
    assert close(freqs(SamplingParams(top_k=3, top_p=0.8)), renorm([0, 1]))


def _naive_keep(row: torch.Tensor, k: int, p: float) -> set[int]:
    order = sorted(range(len(row)), key=lambda i: -float(row[i]))
    if k:
        order = order[:k]
    probs = torch.tensor([float(row[i]) for i in order], dtype=torch.float64).softmax(-1).tolist()
    keep, mass = set(), 0.0
    for i, q in zip(order, probs):
        if mass >= p:  # the more likely tokens already reach p
            break
        keep.add(i)
        mass += q
    return keep


def test_top_k_top_p_match_naive_reference() -> None:
    g = torch.Generator().manual_seed(1)
    n, vocab = 40, 50
    logits = torch.randn(n, vocab, generator=g) * 3
    ks = torch.randint(0, 12, (n,), generator=g)
    ps = torch.rand(n, generator=g).clamp_min(0.05)
    ps[::3] = 1.0
    out = apply_top_k_top_p(logits.clone(), ks, int(ks.max()), ps)
    for i in range(n):
        kept = set(torch.nonzero(out[i] > float("-inf")).flatten().tolist())
        assert kept == _naive_keep(logits[i], int(ks[i]), float(ps[i])), i
        assert torch.equal(out[i][list(kept)], logits[i][list(kept)])
    only_k = apply_top_k_top_p(logits.clone(), ks, int(ks.max()), None)
    for i in range(n):
        assert int((only_k[i] > float("-inf")).sum()) == (int(ks[i]) or vocab)


def test_penalties_match_formula() -> None:
    g = torch.Generator().manual_seed(2)
    n, vocab = 5, 20
    logits = torch.randn(n, vocab, generator=g)
    prompts = [torch.randint(0, vocab, (6,), generator=g).tolist() for _ in range(n)]
    outputs = [torch.randint(0, vocab, (i * 3,), generator=g).tolist() for i in range(n)]
    params = [
        SamplingParams(repetition_penalty=1.0 + 0.3 * i, presence_penalty=0.2 * i, frequency_penalty=-0.1 * i)
        for i in range(n)
    ]
    got = logits.clone()
    apply_penalties(got, build(params, prompts, outputs, vocab=vocab))
    want = logits.clone()
    for i, p in enumerate(params):
        for t in range(vocab):
            x = float(want[i, t])
            if t in prompts[i] or t in outputs[i]:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            x -= p.frequency_penalty * outputs[i].count(t) + p.presence_penalty * (t in outputs[i])
            want[i, t] = x
    torch.testing.assert_close(got, want)


def test_repetition_penalty_covers_prompt_and_output() -> None:
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    pos = torch.tensor([[3.0, 2.5, 0, 0, 0, 0, 0, 0]])
    assert sample([SamplingParams(temperature=0.0)], pos, prompts=[[0]]).sampled_token_ids == [0]
    assert sample([greedy], pos, prompts=[[0]]).sampled_token_ids == [1]  # 3 / 1.5 < 2.5
    assert sample([greedy], pos, outputs=[[0]]).sampled_token_ids == [1]
    neg = torch.tensor([[-1.0, -1.2, -9, -9, -9, -9, -9, -9]])
    assert sample([greedy], neg, outputs=[[0]]).sampled_token_ids == [1]  # -1 * 1.5 < -1.2


def test_presence_and_frequency_penalties_use_output_only() -> None:
    logits = torch.tensor([[1.0, 0.5, 0, 0, 0, 0, 0, 0]])
    presence = SamplingParams(temperature=0.0, presence_penalty=0.6)
    assert sample([presence], logits, outputs=[[0]]).sampled_token_ids == [1]
    assert sample([presence], logits, prompts=[[0]]).sampled_token_ids == [0]
    frequency = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert sample([frequency], logits, outputs=[[0]]).sampled_token_ids == [0]  # 1 - 0.2 > 0.5
    assert sample([frequency], logits, outputs=[[0, 0, 0]]).sampled_token_ids == [1]  # 1 - 0.6 < 0.5
    assert sample([frequency], logits, prompts=[[0, 0, 0]]).sampled_token_ids == [0]


def test_logit_bias() -> None:
    assert sample([SamplingParams(temperature=0.0, logit_bias={5: 100})], LOGITS[None]).sampled_token_ids == [
        5
    ]
    f = freqs(SamplingParams(logit_bias={0: -100}))
    assert f[0] == 0 and close(f, renorm([1, 2, 3]))


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    logits = LOGITS[None]
    assert sample([params], logits, outputs=[[]], eos=[0]).sampled_token_ids == [2]
    assert sample([params], logits, outputs=[[4]], eos=[0]).sampled_token_ids == [2]
    assert sample([params], logits, outputs=[[4, 4]], eos=[0]).sampled_token_ids == [0]
    no_stop = SamplingParams(temperature=0.0, min_tokens=2)
    assert sample([no_stop], logits, outputs=[[]], eos=[0]).sampled_token_ids == [1]


def _seeded_run(
    seed: int, others: int, position: int, steps: int = 12, device: torch.device = CPU
) -> list[int]:
    """Tokens of a seeded row sampled `steps` times inside batches of unseeded noise rows."""
    gen = make_generator(seed, device)
    tokens = []
    flat = torch.zeros(1, 64)
    for step in range(steps):
        torch.manual_seed(1000 + step * 7 + others)  # the other rows vary freely
        n = others + 1
        params = [SamplingParams(temperature=1.3)] * n
        params[position] = SamplingParams(seed=seed, temperature=1.3)
        gens: list[torch.Generator | None] = [None] * n
        gens[position] = gen
        logits = torch.randn(n, 64)
        logits[position] = flat
        out = sample(params, logits.to(device), gens=gens, vocab=64, device=device)
        tokens.append(out.sampled_token_ids[position])
    return tokens


def test_seed_gives_same_tokens_regardless_of_batch() -> None:
    base = _seeded_run(42, others=0, position=0)
    assert _seeded_run(42, others=5, position=3) == base
    assert _seeded_run(42, others=2, position=0) == base
    assert _seeded_run(43, others=2, position=1) != base
    assert len(set(base)) > 3  # really random over a flat distribution


def test_seeded_rows_follow_the_distribution() -> None:
    gen = make_generator(7, CPU)
    counts = torch.zeros(V, dtype=torch.float64)
    meta_params = [SamplingParams(seed=7)]
    for _ in range(1500):
        out = Sampler()(LOGITS[None].clone(), build(meta_params, gens=[gen]))
        counts[out.sampled_token_ids[0]] += 1
    assert bool(((counts / 1500) - PROBS.double()).abs().max() < 0.06)


def test_seeded_row_without_generator_is_an_error() -> None:
    with pytest.raises(ValueError, match="no generator"):
        build([SamplingParams(seed=1)])


def test_logprobs_are_raw_topk_plus_sampled_with_rank() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30, generator=g)
    params = [
        SamplingParams(temperature=0.3, repetition_penalty=1.7, logprobs=3, logit_bias={7: 5.0}),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=0, logit_bias={5: 100}),
        SamplingParams(logprobs=5),
    ]
    torch.manual_seed(0)
    out = sample(params, logits, outputs=[[1, 2], [], [], []], vocab=30)
    raw = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    assert out.sampled_token_ids[2] == 5
    for row, k in ((0, 3), (2, 0), (3, 5)):
        lp = out.logprobs[row]
        assert lp is not None and len(lp) == 1
        ids, vals, rank = lp.token_ids[0], lp.logprobs[0], lp.ranks[0]
        token = out.sampled_token_ids[row]
        assert ids[0] == token and len(ids) == 1 + k
        assert ids[1:] == raw[row].topk(k).indices.tolist() if k else ids[1:] == []
        assert vals == pytest.approx(raw[row][ids].tolist(), abs=1e-6)
        assert rank == int((raw[row] >= raw[row, token]).sum())
    assert out.logprobs[2] is not None and out.logprobs[2].ranks[0] > 1  # the bias forced a low-ranked token


def test_compute_prompt_logprobs() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 12, generator=g)
    targets = torch.tensor([3, 0, 11, 5, 5])
    lp = compute_prompt_logprobs(logits, targets, 2)
    raw = logits.log_softmax(-1)
    assert len(lp) == 5
    for i in range(5):
        assert (
            lp.token_ids[i][0] == int(targets[i]) and lp.token_ids[i][1:] == raw[i].topk(2).indices.tolist()
        )
        assert lp.logprobs[i] == pytest.approx(raw[i][lp.token_ids[i]].tolist(), abs=1e-6)
        assert lp.ranks[i] == int((raw[i] >= raw[i, targets[i]]).sum())
    assert math.isclose(sum(math.exp(x) for x in raw[0].tolist()), 1.0, rel_tol=1e-5)


def test_metadata_skips_unneeded_work() -> None:
    meta = build([SamplingParams(), SamplingParams(temperature=0.0)])
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.output_tokens is None and meta.prompt_tokens is None and meta.repetition_penalties is None
    assert meta.logit_bias is None and meta.min_tokens_mask is None and meta.logprob_rows is None
    assert not meta.all_greedy and not meta.all_random and meta.greedy_mask is not None
    meta = build([SamplingParams(presence_penalty=0.5)])
    assert meta.output_tokens is not None and meta.prompt_tokens is None  # prompt only for repetition
    assert build([SamplingParams(temperature=0.0)] * 2).temperature is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    """Every feature at once on CUDA: greedy rows and logprobs equal the CPU result, seeded rows
    are batch-independent, and the sampled distribution is the exact one."""
    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(5)
    n, vocab = 16, 300
    logits = torch.randn(n, vocab, generator=g) * 2
    params = [
        SamplingParams(
            temperature=0.0 if i % 2 else 0.8,
            top_k=(i % 5) * 7,
            top_p=1.0 if i % 3 else 0.9,
            min_p=0.05 if i % 4 == 0 else 0.0,
            repetition_penalty=1.2,
            presence_penalty=0.3,
            frequency_penalty=0.1,
            logit_bias={i: 3.0},
            min_tokens=2,
            logprobs=i % 4,
        )
        for i in range(n)
    ]
    prompts = [torch.randint(0, vocab, (10,), generator=g).tolist() for _ in range(n)]
    outputs = [torch.randint(0, vocab, (i % 3,), generator=g).tolist() for i in range(n)]
    eos = [7] * n
    cpu_out = Sampler()(logits.clone(), build(params, prompts, outputs, eos=eos, vocab=vocab))  # type: ignore[arg-type]
    gpu_out = Sampler()(logits.to(cuda), build(params, prompts, outputs, eos=eos, vocab=vocab, device=cuda))  # type: ignore[arg-type]
    for i in range(1, n, 2):
        assert gpu_out.sampled_token_ids[i] == cpu_out.sampled_token_ids[i]
    for i in range(n):
        a, b = cpu_out.logprobs[i], gpu_out.logprobs[i]
        assert a is not None and b is not None and len(b.token_ids[0]) == 1 + i % 4
        raw = logits[i].log_softmax(-1)
        assert b.logprobs[0] == pytest.approx(raw[b.token_ids[0]].tolist(), abs=1e-4)
        assert b.token_ids[0][1:] == a.token_ids[0][1:]
        assert gpu_out.sampled_token_ids[i] != 7  # min_tokens masks EOS
    base = _seeded_run(42, others=0, position=0, device=cuda)
    assert _seeded_run(42, others=5, position=3, device=cuda) == base
    assert len(set(base)) > 3
    torch.manual_seed(0)
    m = 20000
    out = Sampler()(
        LOGITS.expand(m, -1).contiguous().to(cuda), build([SamplingParams(top_p=0.7)] * m, device=cuda)
    )
    f = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=V).double() / m
    assert close(f, renorm([0, 1]))
