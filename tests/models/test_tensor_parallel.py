"""Tensor parallelism without processes: tp = 2 and 4 shards of a checkpoint, one thread per rank
over an in-process Communicator (tests/models/thread_comm.py), give the logits of tp = 1.

Covered: every architecture; KV heads replicated (llama3 has 1 KV head, the others 2, so tp = 4
replicates); tied embeddings (llama3, qwen3); a vocabulary not divisible by tp with biases on
every projection (row-parallel biases added once); prefill, chunked prefill, mixed batches and
decode steps through the paged KV cache; and the small-batch fused path with the GEMV twin."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from pagedserve.kernels import reference as ref
from pagedserve.kernels.registry import TORCH_KERNELS, GemvLimits
from pagedserve.model_executor.layers.context import ParallelGroup
from pagedserve.model_executor.layers.embedding import ParallelLMHead
from pagedserve.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from pagedserve.model_executor.loader import load_model
from pagedserve.testing.checkpoints import ARCHS, build_checkpoint
from tests.models.test_model_parity import PagedHarness
from tests.models.thread_comm import ThreadGroup

ATOL = 1e-4
TWIN_KERNELS = dataclasses.replace(TORCH_KERNELS, name="torch+gemv-twin",
                                   fused_gemv=ref.fused_gemv_reference,
                                   gemv_limits=GemvLimits(4, 4, 1))


def _steps(vocab: int) -> list[list[tuple[str, list[int], int, int]]]:
    """Prefill of 2 requests (one chunked), a third joining, then decode steps of 3 and 1 rows."""
    g = torch.Generator().manual_seed(0)
    prompts = {f"r{i}": torch.randint(5, vocab, (n + 6,), generator=g).tolist()
               for i, n in enumerate((19, 40, 7))}
    a, b, c = prompts["r0"], prompts["r1"], prompts["r2"]
    steps = [[("r0", a, 0, 19), ("r1", b, 0, 21)],
             [("r1", b, 21, 40), ("r2", c, 0, 7)]]
    for i in range(4):
        steps.append([("r0", a, 19 + i, 20 + i), ("r1", b, 40 + i, 41 + i), ("r2", c, 7 + i, 8 + i)])
    steps.append([("r1", b, 44, 45)])
    return steps


def _harness(model: Any, kv_heads: int) -> PagedHarness:
    h = PagedHarness(model, seed=1)  # same seed on every rank: the same block tables
    shape = (len(h.kv_caches), *h.kv_caches[0][0].shape)
    h.kv_caches = [(torch.zeros(shape[1:3] + (kv_heads, shape[-1])),
                    torch.zeros(shape[1:3] + (kv_heads, shape[-1]))) for _ in range(shape[0])]
    return h


def run_steps(model: Any, steps: list[Any], kv_heads: int | None = None) -> list[Any]:
    """Logits of every step through the paged cache, then of the first step without a cache
    (the memory-profiling run: dense attention)."""
    h = PagedHarness(model, seed=1) if kv_heads is None else _harness(model, kv_heads)
    out = [h.step(chunk) for chunk in steps]
    h.kv_caches = []
    return [*out, h.step(steps[0])]


def _run_tp(path: str, tp: int, steps: list[Any], kernels: Any = None) -> tuple[list[list[Any]], ThreadGroup]:
    group = ThreadGroup(tp)
    models = [load_model(path, torch.float32, "cpu", show_progress=False, kernels=kernels,
                         parallel=ParallelGroup(r, tp, group.comm(r))).model for r in range(tp)]

    def rank_run(rank: int) -> list[Any]:
        model = models[rank]
        qkv = next(m for m in model.modules() if isinstance(m, QKVParallelLinear))
        return run_steps(model, steps, qkv.num_kv_heads)

    return group.run(rank_run), group


def _compare(path: str, tp: int, kernels: Any = None) -> ThreadGroup:
    plain = load_model(path, torch.float32, "cpu", show_progress=False, kernels=kernels).model
    steps = _steps(plain.spec.vocab_size)
    want = run_steps(plain, steps)
    per_rank, group = _run_tp(path, tp, steps, kernels)
    for rank, got in enumerate(per_rank):
        for step, (g, w) in enumerate(zip(got, want, strict=True)):
            for req in w:
                assert g[req].shape == w[req].shape  # the whole vocab, padding trimmed
                err = (g[req] - w[req]).abs().max().item()
                assert err < ATOL, f"tp={tp} rank {rank} step {step} {req}: {err}"
                assert torch.equal(g[req].argmax(-1), w[req].argmax(-1))  # greedy tokens
    return group


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_tp_logits_match_tp1(arch: str, tp: int, tiny_checkpoints: Any) -> None:
    group = _compare(tiny_checkpoints[arch], tp)
    assert "all_reduce" in group.calls and "all_gather" in group.calls


@pytest.fixture(scope="module")
def odd_vocab_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Vocab 509 (prime: padded to 510 / 512 for tp 2 / 4), biases on q/k/v/o and the MLP."""
    return build_checkpoint(str(tmp_path_factory.mktemp("odd_vocab") / "llama"), "llama",
                            vocab_size=509, attention_bias=True, mlp_bias=True)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_odd_vocab_and_row_biases(tp: int, odd_vocab_checkpoint: str) -> None:
    _compare(odd_vocab_checkpoint, tp)
    group = ThreadGroup(tp)
    model = load_model(odd_vocab_checkpoint, torch.float32, "cpu", show_progress=False,
                       parallel=ParallelGroup(tp - 1, tp, group.comm(tp - 1))).model
    head = model.lm_head
    assert isinstance(head, ParallelLMHead) and head.padded_num_embeddings == {2: 510, 4: 512}[tp]
    assert head.weight.shape[0] == head.padded_num_embeddings // tp
    assert torch.all(head.weight[head.vocab_end - head.vocab_start:] == 0)  # padding rows
    rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
    assert rows and all(m.bias is not None and torch.all(m.bias == 0) for m in rows)  # rank > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tp_fused_decode_path(arch: str, tiny_checkpoints: Any) -> None:
    """The small-batch path (norm + GEMV per rank, then the all-reduce) under tp = 2."""
    _compare(tiny_checkpoints[arch], 2, kernels=TWIN_KERNELS)


def test_tp_refuses_shapes_it_cannot_split(tiny_checkpoints: Any) -> None:
    group = ThreadGroup(3)
    with pytest.raises(ValueError, match="num_heads .* divisible by the tensor-parallel size"):
        load_model(tiny_checkpoints["llama"], torch.float32, "cpu", show_progress=False,
                   parallel=ParallelGroup(0, 3, group.comm(0)))
