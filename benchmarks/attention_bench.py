"""Per-layer cost of rotary + KV write + decode attention at Llama-3-8B shapes (GPU only).

    python -m benchmarks.attention_bench [--sweep] [--json OUT]

bf16, 32 q / 8 KV heads, head_dim 128, block_size 16; block tables 256 blocks wide
(max_seq_len 4096, as the decode CUDA graphs are captured). For each shape one CUDA graph replays
32 back-to-back layer calls (each layer on its own KV cache while they fit in 4 GiB, so short
contexts are not served from L2 by the previous layer), timed with CUDA events; the median replay
/ 32 is reported as us per layer.

    unfused: Triton rotary -> Triton write_kv_cache -> paged_attention
    fused:   rotary_write_kv_cache -> paged_attention (the Triton backend's path)

(The decode attention before the device-side split and without the memset was timed against
these with a frozen copy of it, since removed; those numbers are in
benchmarks/results/h100-2026-11-21-s2/RESULTS.md and h200-attention-2026-11-21/.)

Before timing, both paths are checked against the twins (reference.rotary_embedding +
write_kv_cache + paged_attention) at each shape. --sweep also times the new decode kernel alone
over block_n / warps / stages / program targets.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import environment, print_table, write_json
from pagedserve.kernels import reference as ref
from pagedserve.kernels.triton.attention import DEFAULT_TUNING, AttentionTuning, DecodeTiles, paged_attention
from pagedserve.kernels.triton.kv_cache import write_kv_cache
from pagedserve.kernels.triton.rotary import rotary_embedding, rotary_write_kv_cache

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
MAX_SEQ = 4096
LAYERS = 32
DEVICE = "cuda"
SHAPES = ((1, 128), (1, 2048), (4, 2048), (8, 2048), (16, 2048), (32, 2048), (64, 2048), (256, 2048))


@dataclass
class Layer:
    qkv: torch.Tensor  # [B, (H + 2 KVH) * d], the projection output
    key_cache: torch.Tensor
    value_cache: torch.Tensor


@dataclass
class Batch:
    positions: torch.Tensor
    slots: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    qsl: torch.Tensor
    cos_sin: torch.Tensor
    layers: list[Layer]


def make_batch(batch: int, ctx: int, gen: torch.Generator) -> Batch:
    dev = DEVICE
    n_blocks = -(-ctx // BLOCK)
    num_blocks = batch * n_blocks + 1
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = torch.zeros((batch, MAX_SEQ // BLOCK), dtype=torch.int32)
    tables[:, :n_blocks] = perm[: batch * n_blocks].view(batch, n_blocks).to(torch.int32)
    tables = tables.to(dev)
    pos = torch.full((batch,), ctx - 1, dtype=torch.int64, device=dev)
    slots = tables[:, (ctx - 1) // BLOCK].long() * BLOCK + (ctx - 1) % BLOCK
    per_layer = 2 * num_blocks * BLOCK * KV_HEADS * HEAD_DIM * 2
    n_caches = max(1, min(LAYERS, (4 << 30) // per_layer))
    caches = []
    for _ in range(n_caches):
        kc = torch.randn((num_blocks, BLOCK, KV_HEADS, HEAD_DIM), device=dev, dtype=torch.bfloat16)
        caches.append((kc, torch.randn_like(kc)))
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    freqs = torch.outer(torch.arange(MAX_SEQ, dtype=torch.float32), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dev)
    layers = [
        Layer(torch.randn((batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM), device=dev, dtype=torch.bfloat16),
              *caches[i % n_caches])
        for i in range(LAYERS)
    ]  # fmt: skip
    return Batch(pos, slots, torch.full((batch,), ctx, dtype=torch.int32, device=dev), tables,
                 torch.arange(batch + 1, dtype=torch.int32, device=dev), cos_sin, layers)  # fmt: skip


def split(layer: Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = layer.qkv.shape[0]
    q = layer.qkv[:, : HEADS * HEAD_DIM].view(b, HEADS, HEAD_DIM)
    k = layer.qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(b, KV_HEADS, HEAD_DIM)
    v = layer.qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(b, KV_HEADS, HEAD_DIM)
    return q, k, v


def unfused_layer(bt: Batch, layer: Layer) -> torch.Tensor:
    q, k, v = split(layer)
    q, k = rotary_embedding(bt.positions, q, k, bt.cos_sin)
    write_kv_cache(k, v, layer.key_cache, layer.value_cache, bt.slots)
    return attend(bt, layer, q)


def fused_layer(bt: Batch, layer: Layer, tuning: AttentionTuning = DEFAULT_TUNING) -> torch.Tensor:
    q, k, v = split(layer)
    rotary_write_kv_cache(bt.positions, q, k, v, bt.cos_sin, True, layer.key_cache, layer.value_cache, bt.slots)
    return attend(bt, layer, q, tuning)


def attend(bt: Batch, layer: Layer, q: torch.Tensor, tuning: AttentionTuning = DEFAULT_TUNING) -> torch.Tensor:
    return paged_attention(q, layer.key_cache, layer.value_cache, bt.block_tables, bt.seq_lens, bt.qsl,
                           HEAD_DIM**-0.5, max_query_len=1, max_seq_len=MAX_SEQ, tuning=tuning)  # fmt: skip


def attend_tuned(bt: Batch, layer: Layer, tuning: AttentionTuning) -> torch.Tensor:
    return attend(bt, layer, split(layer)[0], tuning)


def twin_layer(bt: Batch, layer: Layer) -> torch.Tensor:
    q, k, v = split(layer)
    q, k = ref.rotary_embedding(bt.positions, q, k, bt.cos_sin)
    ref.write_kv_cache(k, v, layer.key_cache, layer.value_cache, bt.slots)
    return ref.paged_attention(q, layer.key_cache, layer.value_cache, bt.block_tables, bt.seq_lens, bt.qsl,
                               HEAD_DIM**-0.5)  # fmt: skip


def check(bt: Batch) -> dict[str, float]:
    """Max |err| of both paths vs the twins on layer 0 (fresh copies; caches compared too)."""
    errs = {}
    for name, fn in (("unfused", unfused_layer), ("fused", fused_layer)):
        l0 = bt.layers[0]
        mine = Layer(l0.qkv.clone(), l0.key_cache.clone(), l0.value_cache.clone())
        twin = Layer(l0.qkv.clone(), l0.key_cache.clone(), l0.value_cache.clone())
        got, want = fn(bt, mine), twin_layer(bt, twin)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2e-2)
        torch.testing.assert_close(mine.key_cache, twin.key_cache, atol=1e-2, rtol=2e-2)
        assert torch.equal(mine.value_cache, twin.value_cache)
        errs[name] = float((got.float() - want.float()).abs().max())
    return errs


def time_graph(body: Callable[[], None], reps: int = 30) -> float:
    """Median us of one replay of a graph of `body` (which makes LAYERS calls) / LAYERS."""
    for _ in range(2):
        body()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / LAYERS)
    del graph
    return statistics.median(times)


def bench_shape(batch: int, ctx: int, sweep: bool) -> tuple[dict, list[dict]]:
    bt = make_batch(batch, ctx, torch.Generator().manual_seed(batch * 7919 + ctx))
    errs = check(bt)

    def run(fn: Callable[[Layer], object]) -> Callable[[], None]:
        def body() -> None:
            for layer in bt.layers:
                fn(layer)

        return body

    def rotary(layer: Layer) -> object:
        q, k, _ = split(layer)
        return rotary_embedding(bt.positions, q, k, bt.cos_sin)

    def write(layer: Layer) -> None:
        _, k, v = split(layer)
        write_kv_cache(k, v, layer.key_cache, layer.value_cache, bt.slots)

    def fused(layer: Layer) -> object:
        q, k, v = split(layer)
        return rotary_write_kv_cache(bt.positions, q, k, v, bt.cos_sin, True, layer.key_cache,
                                     layer.value_cache, bt.slots)  # fmt: skip

    row = {
        "B": batch,
        "ctx": ctx,
        "unfused_us": time_graph(run(lambda lay: unfused_layer(bt, lay))),
        "fused_us": time_graph(run(lambda lay: fused_layer(bt, lay))),
        "rotary": time_graph(run(rotary)),
        "write": time_graph(run(write)),
        "fused_rotary_write": time_graph(run(fused)),
        "attn": time_graph(run(lambda lay: attend(bt, lay, split(lay)[0]))),
        "err_unfused": errs["unfused"],
        "err_fused": errs["fused"],
    }
    sweep_rows: list[dict] = []
    if sweep:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        if batch == 1:  # latency bound: tile shape and the shortest partition matter
            grid = itertools.product((32, 64, 128), (4, 8), (1, 2), (0, 128, 256, 512), (4,))
        else:  # bandwidth bound: the number of partitions matters
            grid = itertools.product((32, 64), (2, 4), (2, 3), (128,), (1, 2, 4))
        for block_n, warps, stages, min_part, mult in grid:
            tuning = AttentionTuning(decode_tiles=DecodeTiles(block_n, warps, stages),
                                     decode_target_programs=mult * sms, decode_min_partition=min_part)  # fmt: skip
            us = time_graph(run(functools.partial(attend_tuned, bt, tuning=tuning)), reps=10)
            sweep_rows.append({"B": batch, "ctx": ctx, "block_n": block_n, "warps": warps, "stages": stages,
                               "min_part": min_part, "programs": f"{mult}xSM", "attn_us": us})  # fmt: skip
    bt.layers.clear()
    torch.cuda.empty_cache()
    return row, sweep_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, sweeps = [], []
    for batch, ctx in SHAPES:
        row, sweep_rows = bench_shape(batch, ctx, args.sweep)
        rows.append(row)
        sweeps += sweep_rows
    print_table(f"rotary + KV write + decode attention, us per layer ({environment()['device']})", rows)
    if sweeps:
        for batch, ctx in SHAPES:
            best = sorted((r for r in sweeps if (r["B"], r["ctx"]) == (batch, ctx)), key=lambda r: r["attn_us"])
            print_table(f"decode sweep B={batch} ctx={ctx}: 8 best of {len(best)}", best[:8])
    write_json(args.json, {"rows": rows, "sweep": sweeps})


if __name__ == "__main__":
    main()
