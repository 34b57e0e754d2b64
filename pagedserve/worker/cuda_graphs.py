"""CUDA graphs for decode steps (GPU only).

A decode step of B requests is one token per request, so its shapes depend only on B. At start-up
the model's forward is captured once per batch size in CAPTURE_SIZES (up to max_num_seqs), over
static input buffers; a step with B requests replays the smallest captured size >= B after
copying its inputs into the buffers' first B rows. The padding rows are harmless:

    row:            0 .. B-1 (real)          B .. size-1 (padding)
    slot_mapping    real slots               -1  (the KV write skips them)
    seq_lens        real context lengths     1   (attend to one slot of block 0; output unused)
    block_tables    real tables              0
    query_start_loc 0, 1, 2, ..., size       (one query per row, fixed at capture)

The attention decode kernel sizes its grid from block_tables.shape[1] * block_size, a constant of
the buffers, so no host value is baked into a graph except through these buffers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pagedserve.model_executor.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (vLLM's spacing), ascending."""
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(
        self,
        model: Any,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        max_bs = self.sizes[-1]
        self.block_size = block_size
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_bs, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.block_size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: later graphs reuse its memory
            meta = self._metadata(size)
            args = (self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                self.model(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(*args)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
                    len(self.sizes), self.sizes[-1], self.capture_seconds)

    def size_for(self, batch: int) -> int | None:
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor | None:
        """Replay for a decode batch; None when no graph fits (the caller runs eagerly)."""
        batch = input_ids.shape[0]
        size = self.size_for(batch)
        if size is None or metadata.block_tables.shape[1] > self.block_tables.shape[1]:
            return None
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(metadata.slot_mapping)
        self.slot_mapping[batch:size].fill_(-1)
        self.seq_lens[:batch].copy_(metadata.seq_lens)
        self.seq_lens[batch:size].fill_(1)
        width = metadata.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(metadata.block_tables)
        self.block_tables[batch:size].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:batch]
