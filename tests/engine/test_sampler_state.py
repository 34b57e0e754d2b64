"""Persistent sampling state and the memory profile's sampler pass (CPU).

PenaltyState keeps device token counts updated by diffs: they must equal the counts of the token
lists at every step, survive slot reuse, and fall back to the lists when full. The profile runs
the sampler's most expensive path on max_num_seqs float32 rows, and the budget arithmetic (with
the CUDA-graph pool) is checked against a fake allocator.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.input_batch import RequestState
from pagedserve.worker.kv_cache import graph_pool_margin, profile_forward, profile_gpu_kv_budget
from pagedserve.worker.sampler import Sampler, SamplerOutput, SamplingMetadata
from pagedserve.worker.sampling_state import PenaltyState
from pagedserve.worker.step_sampling import StepSampler

CPU = torch.device("cpu")
V = 30


def _state(req_id: str, prompt: list[int], params: SamplingParams) -> RequestState:
    return RequestState(req_id, list(prompt), [], params, [], 0, None)


def test_counts_follow_the_token_lists_across_steps_and_slot_reuse() -> None:
    pen = SamplingParams(repetition_penalty=1.2)
    live = {"a": _state("a", [1, 2, 2], pen), "b": _state("b", [3], SamplingParams()),
            "c": _state("c", [4, 5], pen)}
    table = PenaltyState(max_rows=2, vocab_size=V, device=CPU)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        if step == 3:  # a finishes; d arrives (resumed with outputs) and takes a's slot
            del live["a"]
            live["d"] = _state("d", [7], pen)
            live["d"].output_token_ids = [7, 8, 8]
        rows = list(live.values())
        counts = table.lookup(rows, live)
        assert counts is not None
        for row, state in zip(counts.slots.tolist(), rows):
            if state.sampling_params.has_penalties:
                want = torch.bincount(torch.tensor(state.output_token_ids, dtype=torch.long), minlength=V)
                assert torch.equal(counts.counts[row].long(), want)
                assert counts.prompt_seen[row].nonzero().flatten().tolist() == sorted(set(state.prompt_token_ids))
        tokens = torch.randint(0, V, (len(rows),), generator=g).tolist()
        for state, token in zip(rows, tokens):
            state.output_token_ids.append(token)
        table.record(rows, tokens)
    assert live["d"].penalty_slot >= 0 and live["c"].penalty_slot >= 0


def test_full_tables_fall_back_to_the_lists() -> None:
    pen = SamplingParams(presence_penalty=0.5)
    live = {r: _state(r, [1], pen) for r in "ab"}
    table = PenaltyState(max_rows=1, vocab_size=V, device=CPU)
    assert table.lookup(list(live.values()), live) is None


class _Recorder(Sampler):
    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, SamplingMetadata]] = []

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        self.calls.append((logits.clone(), meta))
        return super().__call__(logits, meta)


class _StubModel(torch.nn.Module):
    """forward -> hidden [T, 8]; compute_logits -> [N, V] in bfloat16 (the profile upcasts)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(8, V)
        self.tokens_seen: list[int] = []

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv: Any, meta: Any) -> torch.Tensor:
        self.tokens_seen.append(ids.shape[0])
        return torch.randn(ids.shape[0], 8)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).to(torch.bfloat16)


def test_profile_runs_the_most_expensive_sampler_path() -> None:
    model = _StubModel()
    sampling = StepSampler(model, {}, V, CPU, max_num_seqs=6)
    recorder = sampling.sampler = _Recorder()

    class Sched:
        max_num_batched_tokens, max_model_len, max_num_seqs = 40, 16, 6

    profile_forward(model, Sched(), V, CPU, sample=lambda logits: sampling.profile(logits, max_logprobs=20))
    assert model.tokens_seen == [40]  # one forward at max_num_batched_tokens
    [(logits, meta)] = recorder.calls
    assert logits.shape == (6, V) and logits.dtype == torch.float32
    assert meta.num_rows == 6 and meta.all_random and meta.seeded is not None and meta.seeded.num_rows == 6
    assert meta.top_k is not None and meta.top_p is not None and meta.min_p is not None
    assert meta.token_counts is not None and meta.apply_repetition
    assert meta.frequency_penalties is not None and meta.presence_penalties is not None
    assert meta.logprob_rows is not None and meta.logprob_rows.tolist() == list(range(6))
    assert meta.max_num_logprobs == 20
    assert sampling.penalties.counts is not None  # resident before the KV budget is measured


class _FakeMemory:
    def __init__(self, peaks: list[int], total: int, free: int, reserved: int) -> None:
        self.peaks, self.total, self.free, self.reserved_bytes = peaks, total, free, reserved
        self.calls: list[str] = []

    def reset_peak(self) -> None:
        self.calls.append("reset")

    def peak(self) -> int:
        self.calls.append("peak")
        return self.peaks.pop(0)

    def allocated(self) -> int:
        return 100

    def reserved(self) -> int:
        return self.reserved_bytes

    def free_total(self) -> tuple[int, int]:
        return self.free, self.total


def test_budget_subtracts_peak_non_torch_and_graph_pool() -> None:
    mem = _FakeMemory([600], total=1000, free=300, reserved=650)  # non-torch 50
    ran: list[str] = []
    budget = profile_gpu_kv_budget(lambda: ran.append("step"), 0.9, CPU,
                                   run_graph_step=lambda: 70, memory=mem)
    assert ran == ["step"] and mem.calls == ["reset", "peak"]
    assert budget == 900 - 600 - 50 - 70


def test_configuration_that_cannot_fit_is_a_startup_error() -> None:
    mem = _FakeMemory([880], total=1000, free=100, reserved=890)
    with pytest.raises(RuntimeError, match="does not fit.*max_num_seqs"):
        profile_gpu_kv_budget(lambda: None, 0.9, CPU, run_graph_step=lambda: 50, memory=mem)


def test_graph_pool_margin_counts_every_size_outputs() -> None:
    """Capture sizes for 16 seqs: 1, 2, 4, 8, 16; hidden and argmax of 1+2+4+8 = 15 smaller rows
    kept (the logits of every size share one buffer, inside the largest step's peak)."""
    model = _StubModel()
    mem = _FakeMemory([100 + 5000], total=0, free=0, reserved=0)  # step peak 5000 above base 100
    margin = graph_pool_margin(model, 16, CPU, memory=mem)
    row = 8 * 4 + 8  # hidden float32, argmax int64
    assert margin == 5000 + 15 * row


def test_graph_pool_margin_counts_the_mixed_step_graphs() -> None:
    """With mixed-step graphs (8, 16, 32 tokens) in the same pool: the larger of the two largest
    steps' peaks (the mixed one here, run at 32 tokens), plus the decode sizes' kept rows and the
    hidden rows of the smaller mixed sizes (8 + 16)."""
    model = _StubModel()
    mem = _FakeMemory([100 + 5000, 100 + 7000], total=0, free=0, reserved=0)
    margin = graph_pool_margin(model, 16, CPU, memory=mem, mixed_sizes=[8, 16, 32])
    assert model.tokens_seen == [16, 32]
    assert margin == 7000 + 15 * (8 * 4 + 8) + (8 + 16) * 8 * 4
    mem = _FakeMemory([100 + 5000, 100 + 300], total=0, free=0, reserved=0)  # decode's peak larger
    assert graph_pool_margin(model, 16, CPU, memory=mem, mixed_sizes=[8, 16, 32]) == 5000 + 15 * 40 + 24 * 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_1024_seqs_16384_tokens_full_sampling_batch_fits(tmp_path: Any) -> None:
    """vLLM V1's offline defaults on an H200 start under gpu_memory_utilization 0.9 and run a full
    batch of 1024 requests with every sampling option without running out of memory. A small model
    with Llama 3's vocabulary (128256), so the float32 logits, the sampler's buffers and the
    CUDA-graph outputs are as large as the 8B model's."""
    from pagedserve import LLM
    from pagedserve.testing.checkpoints import build_checkpoint

    path = build_checkpoint(str(tmp_path / "llama-128k-vocab"), "llama", dtype="bfloat16", vocab_size=128256)
    llm = LLM(path, dtype="bfloat16", max_model_len=512, max_num_seqs=1024,
              max_num_batched_tokens=16384, gpu_memory_utilization=0.9)
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
                            presence_penalty=0.1, frequency_penalty=0.1, logprobs=20, seed=1,
                            max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": [(7 * i + j) % 400 + 10 for j in range(16)]} for i in range(1024)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outs) == 1024 and all(len(o.outputs[0].token_ids) == 8 for o in outs)


class _FullRowSampler(Sampler):
    compact = False


def test_candidate_draw_equals_full_row_draw_for_seeded_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counter-seeded rows draw the same tokens whether the race runs on the candidates or over
    the full row (same noise per token, zero probability outside the kept set)."""
    from pagedserve.kernels.reference_sampling import seeded_exponential
    from pagedserve.worker.sampling_state import SeededDraws

    g = torch.Generator().manual_seed(9)
    n, vocab = 24, 3000
    logits = torch.randn(n, vocab, generator=g) * 3
    params = [SamplingParams(temperature=0.7, top_k=50 if i % 3 else 0,
                             top_p=0.9 if i % 2 or i % 3 == 0 else 1.0, seed=i) for i in range(n)]
    import pagedserve.worker.sampler as sampler_module

    compact_calls: list[int] = []
    race = sampler_module.candidate_race
    monkeypatch.setattr(sampler_module, "candidate_race",
                        lambda c, s: compact_calls.append(1) or race(c, s))
    params[5] = SamplingParams(temperature=0.0)  # a greedy row in the batch
    tokens = []
    for sampler in (Sampler(), _FullRowSampler()):
        for step in range(3):
            rows = [i for i in range(n) if i != 5]
            seeded = SeededDraws(torch.tensor(rows), torch.tensor([r * 7919 + step for r in rows]), len(rows),
                                 seeded_exponential)
            meta = SamplingMetadata.build(params, [[]] * n, [[]] * n, [None] * n, [None] * n, vocab, CPU,
                                          seeded=seeded)
            tokens.append(sampler(logits.clone(), meta).sampled_token_ids)
    assert len(compact_calls) == 3  # the first sampler took the candidate path every step
    assert tokens[:3] == tokens[3:]
    assert tokens[0] != tokens[1]  # the step seed changes the draw
    assert tokens[0][5] == int(logits[5].argmax())


def test_profile_passes_run_on_a_real_model(tiny_checkpoints: Any) -> None:
    """The GPU profile's passes on the tiny llama (CPU): the largest step with the real sampler's
    worst path, and the eager decode step that sizes the CUDA-graph pool."""
    from pagedserve import EngineArgs
    from pagedserve.worker.model_runner import ModelRunner

    config = EngineArgs(model=tiny_checkpoints["llama"], dtype="float32", device="cpu", max_model_len=64,
                        max_num_seqs=8, max_num_batched_tokens=96,
                        kv_cache_memory_bytes=1 << 20).create_engine_config()
    runner = ModelRunner(config)
    recorder = runner.sampling.sampler = _Recorder()
    profile_forward(runner.model, config.scheduler_config, runner.vocab_size, CPU,
                    sample=lambda logits: runner.sampling.profile(logits, 5))
    [(logits, meta)] = recorder.calls
    assert logits.shape == (8, runner.vocab_size) and logits.dtype == torch.float32
    assert meta.max_num_logprobs == 5 and meta.token_counts is not None
    mem = _FakeMemory([100 + 1234], total=0, free=0, reserved=0)
    hidden = runner.model_spec.hidden_size
    row = hidden * 4 + 8  # float32 hidden, int64 argmax (the logits share one buffer)
    assert graph_pool_margin(runner.model, 8, CPU, memory=mem) == 1234 + (1 + 2 + 4) * row


@pytest.mark.parametrize("params", [SamplingParams(top_k=3), SamplingParams(top_p=0.7),
                                    SamplingParams(top_k=3, top_p=0.7)])
def test_candidate_draw_follows_the_truncated_distribution(params: SamplingParams) -> None:
    """V = 3000 > C: the draw on the candidates alone samples the kept tokens with their
    renormalised probabilities (4000 draws, tolerance about 5 standard deviations)."""
    vocab, num = 3000, 4000
    probs = torch.full((vocab,), 1e-9, dtype=torch.float64)
    probs[:4] = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    row = probs.log().float()
    keep = [0, 1, 2] if params.top_k == 3 and params.top_p == 1.0 else [0, 1]  # token 2: ascending mass 0.2 <= 0.3
    want = torch.zeros(vocab, dtype=torch.float64)
    want[keep] = probs[keep] / probs[keep].sum()
    torch.manual_seed(0)
    meta = SamplingMetadata.build([params] * num, [[]] * num, [[]] * num, [None] * num, [None] * num,
                                  vocab, CPU)
    out = Sampler()(row.expand(num, -1).contiguous(), meta)
    got = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=vocab).double() / num
    assert float((got - want).abs().max()) < 0.04


def test_prompt_logprobs_in_slices_of_max_num_seqs_rows(tiny_checkpoints: Any) -> None:
    """A 40-token prompt chunk with max_num_seqs 4: the LM head runs on 4 rows at a time (the
    profiled logits size) and the prompt logprobs equal those of one slice (max_num_seqs 64)."""
    from tests.engine.engine_helpers import make_engine, make_prompts, run_staggered

    [prompt] = make_prompts(512, seed=13, lengths=(40,))
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    got = {}
    for seqs in (4, 64):
        out = run_staggered(make_engine(tiny_checkpoints["llama"], max_num_seqs=seqs), [prompt], params)["0"]
        got[seqs] = out.prompt_logprobs
    assert got[4] is not None and len(got[4]) == 40
    for a, b in zip(got[4][1:], got[64][1:]):
        assert a is not None and b is not None and a.keys() == b.keys()
        for token in a:
            assert abs(a[token].logprob - b[token].logprob) < 1e-5 and a[token].rank == b[token].rank


def test_memory_in_use_before_the_engine_is_not_its_own() -> None:
    """Another engine on the same GPU (250 of 1000 in use before this one loaded): this engine's
    share is still 0.45 of the device, its non-torch memory only what it added (50)."""
    mem = _FakeMemory([300], total=1000, free=1000 - 250 - 300 - 50, reserved=300)
    budget = profile_gpu_kv_budget(lambda: None, 0.45, CPU, run_graph_step=lambda: 20, memory=mem,
                                   baseline_used=250)
    assert budget == 450 - 300 - 50 - 20
    # counted as its own, the other engine's 250 would leave nothing: the old formula's error
    with pytest.raises(RuntimeError, match="does not fit"):
        profile_gpu_kv_budget(lambda: None, 0.45, CPU, run_graph_step=lambda: 20,
                              memory=_FakeMemory([300], total=1000, free=400, reserved=300))


def test_other_processes_holding_the_rest_of_the_gpu_is_a_startup_error() -> None:
    """0.9 of the device for this engine, but another process holds 600 of 1000: the KV cache it
    is entitled to is not free, so start-up says so instead of failing in the allocation."""
    mem = _FakeMemory([200], total=1000, free=1000 - 600 - 200, reserved=200)
    with pytest.raises(RuntimeError, match="only 0.00 GiB of the GPU is free.*lower gpu_memory_utilization"):
        profile_gpu_kv_budget(lambda: None, 0.9, CPU, memory=mem, baseline_used=600)
