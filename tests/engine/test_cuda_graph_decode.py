"""Decode through CUDA graphs (LM head and greedy argmax inside the graph) gives what the eager
path gives, for every kind of request in one batch (GPU only)."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

from pagedserve import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _run(path: str, enforce_eager: bool, prompts: list[list[int]], params: list[SamplingParams],
         async_scheduling: bool = False) -> list[Any]:
    llm = LLM(path, dtype="float32", max_model_len=512, max_num_seqs=16, enforce_eager=enforce_eager,
              gpu_memory_utilization=0.3, async_scheduling=async_scheduling)
    assert (llm.llm_engine.engine_core.runner.decode_graphs is None) == enforce_eager
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return outs


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_graph_decode_matches_eager(tiny_checkpoints: Any, async_scheduling: bool) -> None:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 500, (n,), generator=g).tolist() for n in (1, 5, 16, 17, 40, 90, 130, 3, 9)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),  # plain greedy
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, seed=11, max_tokens=22, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=21, ignore_eos=True, logit_bias={7: 2.0}),
        SamplingParams(temperature=0.0, max_tokens=30, min_tokens=25),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=5, max_tokens=19, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=26, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True, prompt_logprobs=2),
    ]
    path = tiny_checkpoints["llama"]
    graph = _run(path, False, prompts, params, async_scheduling)
    eager = _run(path, True, prompts, params)
    for a, b in zip(graph, eager):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        if a.outputs[0].logprobs is not None:
            assert b.outputs[0].logprobs is not None
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert la.keys() == lb.keys()
                for tok in la:
                    assert la[tok].logprob == pytest.approx(lb[tok].logprob, abs=1e-4)


def test_async_graph_decode_of_plain_greedy_batches(tiny_checkpoints: Any) -> None:
    """Only plain greedy requests of different lengths: most steps run async, their inputs filled
    on the device from the graph's argmax, as requests finish and the batch shrinks (rows move)."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(10, 500, (n,), generator=g).tolist() for n in (3, 30, 7, 64, 12, 1, 45)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (9, 40, 3, 25, 1, 33, 17)]
    path = tiny_checkpoints["llama"]
    sync = _run(path, False, prompts, params)
    overlapped = _run(path, False, prompts, params, async_scheduling=True)
    for a, b in zip(sync, overlapped):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
