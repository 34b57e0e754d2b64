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


def _run(path: str, enforce_eager: bool, prompts: list[list[int]], params: list[SamplingParams]) -> list[Any]:
    llm = LLM(path, dtype="float32", max_model_len=512, max_num_seqs=16, enforce_eager=enforce_eager,
              gpu_memory_utilization=0.3)
    assert (llm.llm_engine.engine_core.runner.decode_graphs is None) == enforce_eager
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return outs


def test_graph_decode_matches_eager(tiny_checkpoints: Any) -> None:
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
    graph = _run(path, False, prompts, params)
    eager = _run(path, True, prompts, params)
    for a, b in zip(graph, eager):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        if a.outputs[0].logprobs is not None:
            assert b.outputs[0].logprobs is not None
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert la.keys() == lb.keys()
                for tok in la:
                    assert la[tok].logprob == pytest.approx(lb[tok].logprob, abs=1e-4)
