"""Steps with prefill replayed from CUDA graphs (worker/mixed_graphs.py).

CPU: the capture sizes, and the padded buffers a graph runs on (padding tokens with slot -1,
padding requests with no query rows) give the eager step's hidden states and KV writes, through
the same forward eagerly. GPU: an engine whose steps with prefill replay the graphs gives the
tokens of the eager engine, with requests arriving while others decode, synchronous and async."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

from pagedserve import EngineArgs, SamplingParams
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.worker.input_batch import HostInputs, to_device
from pagedserve.worker.mixed_graphs import MixedGraphs, mixed_capture_sizes
from pagedserve.worker.model_runner import ModelRunner

CPU = torch.device("cpu")


def test_capture_sizes_cover_every_step_up_to_the_bound() -> None:
    sizes = mixed_capture_sizes(2048)
    assert sizes == sorted(set(sizes)) and sizes[0] == 8 and sizes[-1] == 1024
    for tokens in range(2, 1025):
        size = min(s for s in sizes if s >= tokens)
        if tokens > 64:
            assert size - tokens < tokens / 4, (tokens, size)
    assert mixed_capture_sizes(300)[-1] == 300  # the budget itself is a size
    assert mixed_capture_sizes(2048, max_tokens=100)[-1] == 100
    assert mixed_capture_sizes(2048, max_tokens=1) == [] and mixed_capture_sizes(1) == []
    assert mixed_capture_sizes(5) == [5]


def _host(requests: list[tuple[list[int], int, int, list[int]]], block_size: int) -> HostInputs:
    """requests: (all token ids, first position computed this step, end, block table)."""
    host = HostInputs()
    for tokens, start, end, table in requests:
        host.token_ids.extend(tokens[start:end])
        host.positions.extend(range(start, end))
        host.slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        host.query_start_loc.append(host.query_start_loc[-1] + end - start)
        host.seq_lens.append(end)
        host.tables.append(table)
        host.max_query_len = max(host.max_query_len, end - start)
        host.max_blocks = max(host.max_blocks, len(table))
    return host


def _eager(runner: ModelRunner, kv: list[tuple[torch.Tensor, torch.Tensor]], host: HostInputs) -> torch.Tensor:
    ids, positions, meta = to_device(host, CPU)
    return runner.model(ids, positions, kv, meta)


@torch.inference_mode()
def test_padded_buffers_give_the_eager_steps_hidden_states_and_kv(tiny_checkpoints: Any) -> None:
    config = EngineArgs(model=tiny_checkpoints["llama"], dtype="float32", device="cpu", max_model_len=128,
                        max_num_seqs=6, max_num_batched_tokens=96, num_gpu_blocks_override=40,
                        swap_space=0).create_engine_config()  # fmt: skip
    runner = ModelRunner(config)
    runner.initialize_kv_cache(40, 0)
    bs = runner.spec.block_size
    eager_kv = runner.kv_caches
    padded_kv = [(k.clone(), v.clone()) for k, v in eager_kv]
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randint(10, 400, (n,), generator=g).tolist() for n in (21, 9, 17))
    table_a, table_b, table_c = [3, 7], [11], [2, 5]  # blocks of 16 (block 0 is no one's)
    # step 1 (eager on both caches): a's prompt but its last token, c's first chunk of 5
    first = _host([(a, 0, 20, table_a), (c, 0, 5, table_c)], bs)
    for kv in (eager_kv, padded_kv):
        _eager(runner, kv, first)
    # step 2, mixed: a decodes its 21st token, b's whole prompt, c's second chunk (5..17)
    mixed_step = _host([(a, 20, 21, table_a), (b, 0, 9, table_b), (c, 5, 17, table_c)], bs)
    expected = _eager(runner, eager_kv, mixed_step)
    # 12 request slots: the graph of 24 tokens has all 12, the graph of 8 (below) only 8
    graphs = MixedGraphs(runner.model, padded_kv, 12, 96, max_blocks_per_seq=8, block_size=bs, device=CPU)
    size = graphs.load(mixed_step)
    assert size == 24 and graphs.seqs_for(size) == 12  # 22 tokens -> 24 rows; 3 requests -> 12 slots
    got = graphs.forward(size)
    assert got.shape[0] == size
    torch.testing.assert_close(got[:22], expected, rtol=1e-5, atol=1e-5)
    for (ke, ve), (kp, vp) in zip(eager_kv, padded_kv):  # padding wrote nothing (slot -1)
        torch.testing.assert_close(kp, ke, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vp, ve, rtol=1e-5, atol=1e-5)
    # a smaller step after a larger one: stale rows of the buffers past it are padding again
    small = _host([(a, 0, 3, [9])], bs)
    scratch = [(k.clone(), v.clone()) for k, v in padded_kv]
    expected_small = _eager(runner, scratch, small)
    size = graphs.load(small)
    assert size == 8 and graphs.seqs_for(size) == 8
    torch.testing.assert_close(graphs.forward(size)[:3], expected_small, rtol=1e-5, atol=1e-5)
    for (ks, vs), (kp, vp) in zip(scratch, padded_kv):
        torch.testing.assert_close(kp, ks, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vp, vs, rtol=1e-5, atol=1e-5)


def test_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="mixed_graph_max_tokens"):
        EngineArgs(model="x", mixed_graph_max_tokens=-1).create_engine_config()


def _engine_tokens(path: str, enforce_eager: bool, async_scheduling: bool,
                   mixed_graph_max_tokens: int = 1024) -> tuple[dict[str, list[int]], int]:
    """Requests arriving every third step while the others decode (steps mix prefill and
    decodes; the 300-token prompt is chunked under 256 batched tokens): ({id: tokens},
    mixed-graph replays)."""
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=path, dtype="float32", max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256,
        enforce_eager=enforce_eager, gpu_memory_utilization=0.3, async_scheduling=async_scheduling,
        mixed_graph_max_tokens=mixed_graph_max_tokens, enable_prefix_caching=False))  # fmt: skip
    runner = engine.engine_core.runner
    assert (runner.mixed_graphs is None) == (enforce_eager or mixed_graph_max_tokens == 0)
    g = torch.Generator().manual_seed(8)
    lengths = (7, 40, 130, 3, 300, 17, 64, 1, 90)
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=28, ignore_eos=True, repetition_penalty=1.2),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=9, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2),
    ]
    tokens: dict[str, list[int]] = {}
    step = 0
    while step < 400 and (step < 3 * len(lengths) or engine.has_unfinished_requests()):
        if step % 3 == 0 and step // 3 < len(lengths):
            i = step // 3
            prompt = torch.randint(10, 500, (lengths[i],), generator=g).tolist()
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params[i % len(params)])
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    replays = runner.mixed_graphs.num_replays if runner.mixed_graphs is not None else 0
    del engine, runner
    gc.collect()
    torch.cuda.empty_cache()
    return tokens, replays


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_mixed_graph_steps_give_the_eager_tokens(tiny_checkpoints: Any, async_scheduling: bool) -> None:
    path = tiny_checkpoints["llama"]
    graph, replays = _engine_tokens(path, False, async_scheduling)
    eager, _ = _engine_tokens(path, True, False)
    off, none = _engine_tokens(path, False, async_scheduling, mixed_graph_max_tokens=0)
    assert len(eager) == 9 and replays >= 9 and none == 0
    assert graph == eager
    assert off == eager
