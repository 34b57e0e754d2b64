"""The parallel layers' weight loaders follow the parameters' declared dims: per-rank slices of
column / QKV (replicated KV) / row layers, fused checkpoint tensors split into their shards,
packed parameters, vocab slices with padding; and with one rank nothing parallel is bound."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from pagedserve.model_executor.layers.context import BuildContext, ParallelGroup
from pagedserve.model_executor.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedserve.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    set_weight_attrs,
)
from tests.models.thread_comm import ThreadGroup


def _ctx(rank: int, tp: int) -> BuildContext:
    comm = ThreadGroup(tp).comm(rank) if tp > 1 else None
    return BuildContext.create(parallel=ParallelGroup(rank, tp, comm))


def test_qkv_slices_per_rank_with_replicated_kv() -> None:
    # 4 query heads, 2 KV heads, head_dim 2, hidden 3; tp = 4 replicates each KV head twice
    q, k, v = (torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + base
               for n, base in ((8, 0), (4, 100), (4, 200)))
    for rank in range(4):
        layer: Any = QKVParallelLinear(3, 2, 4, 2, bias=False, ctx=_ctx(rank, 4))
        assert (layer.num_heads, layer.num_kv_heads) == (1, 1)
        for sid, t in (("q", q), ("k", k), ("v", v)):
            layer.weight.weight_loader(layer.weight, t, sid)
        kv = rank // 2  # ranks 0, 1 hold KV head 0; ranks 2, 3 KV head 1
        want = torch.cat([q[2 * rank:2 * rank + 2], k[2 * kv:2 * kv + 2], v[2 * kv:2 * kv + 2]])
        assert torch.equal(layer.weight, want)
        # the same tensors fused into one checkpoint tensor (W_pack / query_key_value style)
        fused: Any = QKVParallelLinear(3, 2, 4, 2, bias=False, ctx=_ctx(rank, 4))
        fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]))
        assert torch.equal(fused.weight, want)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        QKVParallelLinear(3, 2, 6, 2, ctx=_ctx(0, 3))


def test_merged_and_row_slices() -> None:
    gate, up = torch.randn(8, 6), torch.randn(8, 6)
    down, bias = torch.randn(6, 8), torch.randn(6)
    for rank in range(2):
        gu: Any = MergedColumnParallelLinear(6, [8, 8], ctx=_ctx(rank, 2))
        gu.weight.weight_loader(gu.weight, gate, 0)
        gu.weight.weight_loader(gu.weight, up, 1)
        assert torch.equal(gu.weight, torch.cat([gate[4 * rank:4 * rank + 4], up[4 * rank:4 * rank + 4]]))
        row: Any = RowParallelLinear(8, 6, bias=True, ctx=_ctx(rank, 2))
        row.weight.weight_loader(row.weight, down)
        row.bias.weight_loader(row.bias, bias)
        assert torch.equal(row.weight, down[:, 4 * rank:4 * rank + 4])
        assert torch.equal(row.bias, bias if rank == 0 else torch.zeros(6))  # added once
        with pytest.raises(ValueError, match="does not fit"):
            row.weight.weight_loader(row.weight, down[:, :6])


def test_packed_parameter_offsets_follow_pack_factor() -> None:
    """A parameter packing 2 output features per element: shard offsets are halved."""
    layer: Any = MergedColumnParallelLinear(3, [4, 4], ctx=_ctx(1, 2))  # this rank: 2 + 2 rows
    packed = nn.Parameter(torch.zeros(2, 3), requires_grad=False)
    set_weight_attrs(packed, {"output_dim": 0, "input_dim": 1, "packed_dim": 0, "pack_factor": 2,
                              "weight_loader": layer.weight_loader})
    gate, up = torch.arange(6.0).reshape(2, 3), torch.arange(6.0, 12.0).reshape(2, 3)
    packed.weight_loader(packed, gate, 0)  # 4 logical rows = 2 packed rows; rank 1 takes row 1
    packed.weight_loader(packed, up, 1)
    assert torch.equal(packed, torch.stack([gate[1], up[1]]))


def test_vocab_slices_and_padding() -> None:
    table = torch.randn(10, 4)
    for rank in range(4):  # 10 -> padded 12, 3 rows a rank; rank 3 holds row 9 + 2 padding rows
        emb: Any = VocabParallelEmbedding(10, 4, ctx=_ctx(rank, 4))
        emb.weight.weight_loader(emb.weight, table)
        rows = table[3 * rank:3 * rank + 3]
        assert torch.equal(emb.weight[:len(rows)], rows) and torch.all(emb.weight[len(rows):] == 0)
        head = ParallelLMHead(10, 4, tie_to=emb, ctx=_ctx(rank, 4))
        assert head.weight is emb.weight and head.padded_num_embeddings == 12


def test_one_rank_binds_nothing_parallel() -> None:
    ctx = _ctx(0, 1)
    row, emb = RowParallelLinear(8, 6, ctx=ctx), VocabParallelEmbedding(10, 4, ctx=ctx)
    head = ParallelLMHead(10, 4, ctx=ctx)
    # forward is the class's own plain method: no all-reduce, no masking, no gather
    assert all("forward" not in vars(m) for m in (row, emb, head))
    assert emb.weight.shape == (10, 4) and head.weight.shape == (10, 4)
    parallel = RowParallelLinear(8, 6, ctx=_ctx(0, 2))
    assert vars(parallel)["forward"] == parallel._forward_all_reduce
