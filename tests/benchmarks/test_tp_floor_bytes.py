"""The per-GPU byte counts of benchmarks/tp_gpu.py's decode floor equal the parameters one rank
really holds (its shard, loaded as the worker loads it), at tp 1, 2 and 4 (4 > the KV heads:
replicated), for an untied and a tied vocabulary not divisible by the ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks.tp_gpu import per_gpu_bytes
from pagedserve.model_executor.layers.context import ParallelGroup
from pagedserve.model_executor.layers.linear import QKVParallelLinear
from pagedserve.model_executor.loader import load_model
from pagedserve.testing.checkpoints import build_checkpoint
from tests.models.thread_comm import ThreadGroup


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def odd_checkpoint(request: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_checkpoint(str(tmp_path_factory.mktemp("tp_bytes") / "llama"), "llama", vocab_size=509,
                            tie_word_embeddings=request.param)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_per_gpu_bytes_match_a_ranks_shard(tp: int, odd_checkpoint: str) -> None:
    rank = tp - 1  # the last rank: the vocabulary's padding rows are on it
    parallel = ParallelGroup(rank, tp, ThreadGroup(tp).comm(rank)) if tp > 1 else ParallelGroup()
    model = load_model(odd_checkpoint, torch.float32, "cpu", show_progress=False, parallel=parallel).model
    spec: Any = model.spec
    held = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if "embed_tokens" not in n or spec.tie_word_embeddings)
    weights, kv_per_token = per_gpu_bytes(spec, tp, 4)
    assert weights == held
    qkv: Any = next(m for m in model.modules() if isinstance(m, QKVParallelLinear))  # this rank's KV heads
    assert kv_per_token == 2 * spec.num_layers * qkv.num_kv_heads * spec.head_dim * 4
