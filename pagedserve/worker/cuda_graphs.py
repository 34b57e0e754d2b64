"""CUDA graphs for decode steps (GPU only).

A decode step of B requests is one token per request, so its shapes depend only on B. At start-up
the model's forward, the LM head over every row and the greedy argmax are captured once per batch
size in CAPTURE_SIZES (up to max_num_seqs), over static input buffers; a step with B requests
replays the smallest captured size >= B after loading its inputs into the buffers' first B rows.
The padding rows are harmless:

    row:            0 .. B-1 (real)          B .. size-1 (padding)
    input_ids       real tokens              0
    positions       real positions           0
    slot_mapping    real slots               -1  (the KV write skips them)
    seq_lens        real context lengths     1   (attend to one slot of block 0; output unused)
    block_tables    real tables              [0, stale...] (only column 0 is read: seq_len 1)
    query_start_loc 0, 1, 2, ..., size       (one query per row, fixed at capture)

Loading inputs is two host-to-device copies: the int64 inputs (ids, positions, slots) live in one
device buffer and the int32 ones (seq_lens, block table) in another, each mirrored by a pinned
host buffer that the runner fills with NumPy. A block-table row is read only up to its request's
seq_len, so stale entries past it need no clearing.

The attention decode kernel sizes its grid from block_tables.shape[1] * block_size, a constant of
the buffers, so no host value is baked into a graph except through these buffers.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from pagedserve.model_executor.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

T = TypeVar("T")


def capture_graph(step: Callable[[], T], pool: Any) -> tuple[torch.cuda.CUDAGraph, T]:
    """`step` run twice eagerly (Triton compiles and cuBLAS plans outside the capture), then
    captured into `pool`: the graph and its outputs (static tensors, rewritten by each replay)."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = step()
    return graph, outputs


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (vLLM's spacing), ascending."""
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


@dataclass(slots=True)
class DecodeResult:
    """Views of a replayed graph's outputs for the step's B real rows."""

    hidden: torch.Tensor  # [B, hidden] final hidden states (model dtype)
    logits: torch.Tensor  # [B, vocab] float32
    greedy: torch.Tensor  # [B] int64 argmax of logits


class DecodeGraphs:
    def __init__(
        self,
        model: Any,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        argmax_rows: Callable[[torch.Tensor], torch.Tensor],  # the kernel set's (captured)
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.argmax = argmax_rows
        self.sizes = capture_sizes(max_num_seqs)
        n = self.max_batch = self.sizes[-1]
        self.block_size = block_size
        self.width = max_blocks_per_seq
        # int64: [input_ids | positions | slot_mapping], n each
        self.i64 = torch.zeros(3 * n, dtype=torch.long, device=device)
        self.i64_host = torch.zeros(3 * n, dtype=torch.long, pin_memory=True)
        # int32: [seq_lens (n) | block_tables (n x width)]
        self.i32 = torch.zeros(n + n * self.width, dtype=torch.int32, device=device)
        self.i32_host = torch.zeros(n + n * self.width, dtype=torch.int32, pin_memory=True)
        self._i64_np = self.i64_host.numpy()
        self._i32_np = self.i32_host.numpy()
        self._tables_np = self._i32_np[n:].reshape(n, self.width)
        self.input_ids, self.positions, self.slot_mapping = self.i64.view(3, n)
        self.seq_lens = self.i32[:n]
        self.block_tables = self.i32[n:].view(n, self.width)
        self.seq_lens.fill_(1)
        self.slot_mapping.fill_(-1)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Recorded after each load: the pinned buffers are rewritten only once their last copy ran.
        self._loaded = torch.cuda.Event()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # [max_batch, vocab] float32, allocated at capture: every graph's LM head writes its rows
        # here (rows 0..size), so the pool keeps one logits buffer instead of one per size
        # (the sum over sizes grows with max_num_seqs squared: ~34 GB at 1024 seqs, vocab 128256).
        self.logits_out: torch.Tensor | None = None
        self.capture_seconds = 0.0

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.width * self.block_size,
        )

    def _step(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        meta = self._metadata(size)
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
        out = self.logits_out[:size] if self.logits_out is not None else None
        logits = self.model.compute_logits(hidden, out=out)
        return hidden, logits, self.argmax(logits)

    @torch.inference_mode()
    def capture(self, pool: Any = None) -> None:
        """Capture every size into `pool` (default: a new one; the runner shares its pool with
        the mixed-step graphs)."""
        started = time.perf_counter()
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        vocab = self._step(1)[1].shape[-1]  # eager, outside any graph: the logits' width
        self.logits_out = torch.empty(self.max_batch, vocab, dtype=torch.float32, device=self.i64.device)
        for size in reversed(self.sizes):  # largest first: later graphs reuse its memory
            self.graphs[size], self.outputs[size] = capture_graph(functools.partial(self._step, size), pool)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
                    len(self.sizes), self.sizes[-1], self.capture_seconds)

    def size_for(self, batch: int) -> int | None:
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def fits(self, batch: int, max_blocks: int) -> bool:
        return batch <= self.max_batch and max_blocks <= self.width

    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
        fill: Callable[[torch.Tensor], object] | None = None,
    ) -> DecodeResult:
        """Replay for a decode batch of B = len(token_ids) rows (the caller checked `fits`).
        `fill` edits the device input_ids after they are loaded and before the replay (async
        scheduling: ids sampled by the step before, still on the device)."""
        batch = len(token_ids)
        size = self.size_for(batch)
        assert size is not None
        n = self.max_batch
        self._loaded.synchronize()
        i64 = self._i64_np
        i64[:batch] = token_ids
        i64[batch:size] = 0
        i64[n : n + batch] = positions
        i64[n + batch : n + size] = 0
        i64[2 * n : 2 * n + batch] = slots
        i64[2 * n + batch : 2 * n + size] = -1
        i32 = self._i32_np
        i32[:batch] = seq_lens
        i32[batch:size] = 1
        rows = self._tables_np
        for i, table in enumerate(tables):
            rows[i, : len(table)] = table
        rows[batch:size, 0] = 0
        self.i64.copy_(self.i64_host, non_blocking=True)
        used = n + size * self.width  # seq_lens and the first `size` table rows
        self.i32[:used].copy_(self.i32_host[:used], non_blocking=True)
        self._loaded.record()
        if fill is not None:
            fill(self.input_ids)
        self.graphs[size].replay()
        hidden, logits, greedy = self.outputs[size]
        return DecodeResult(hidden[:batch], logits[:batch], greedy[:batch])
