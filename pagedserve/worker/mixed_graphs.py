"""CUDA graphs for steps with prefill: mixed batches of prompt chunks and decodes (GPU only).

Why: the eager forward of an 8B model costs 15-25 ms of host time (Python, about 160 Triton and
130 cuBLAS launches), more than the GPU needs for a few hundred tokens. Decode steps replay a graph
(cuda_graphs.py); a step carrying any prefill ran eagerly and so cost about 16 ms more than its
decodes alone on the H200, whatever the chunk up to 512 tokens
(benchmarks/results/h200-2026-12-02-mixed-step/). That surcharge on every step with prefill is
what kept the SLO controller (issue 15) from admitting work at overload.

Here the model's forward alone (hidden states; the LM head runs afterwards on the rows that
sample, as in the eager path) is captured once per token count in `mixed_capture_sizes`, and a
step of T tokens in B requests replays the smallest size S >= T, with R = min(S, max_num_seqs)
request slots (every request has at least one token, so B <= T <= S and B <= max_num_seqs):

    token rows      0 .. T-1 real                 T .. S-1 padding: id 0, position 0, slot -1
                                                  (the KV write skips it), owned by no request
    request slots   0 .. B-1 real                 B .. R-1 padding: query_start_loc = T (no
                                                  query rows), seq_len 1, table row [0, ...]
    query_start_loc [0, ..., T] then T repeated   [R+1]

The attention runs the varlen kernel (attention_prefill.py, max_query_len > 1 in the metadata),
which handles decode rows too; its grid is T // block_q + B from the shapes, and a program that
lands on a padding request (no query rows) returns at once, so the padded launch computes exactly
what the eager one does. Nothing else in the forward reads a host value: the GEMM and kernel
choices depend on the shapes, which are the graph's.

Inputs load as two host-to-device copies (int64: ids, positions, slots; int32: query_start_loc,
seq_lens, block tables) from pinned buffers filled with NumPy, as the decode graphs do. The same
class runs eagerly on the CPU (`forward`), which is how the padding is tested without a GPU.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from pagedserve.model_executor.layers.attention import AttentionMetadata
from pagedserve.worker.cuda_graphs import capture_graph
from pagedserve.worker.input_batch import HostInputs

logger = logging.getLogger(__name__)

# The largest step replayed from a graph by default: past about 1,000 tokens an 8B step's GPU time
# (2 * 8e9 * 1024 FLOPs at ~790 TFLOP/s: ~21 ms) covers its eager host time, so a graph gains
# little there and costs pool memory (EngineArgs.mixed_graph_max_tokens).
DEFAULT_MAX_TOKENS = 1024


def mixed_capture_sizes(max_num_batched_tokens: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[int]:
    """Token counts captured, ascending, up to min(max_num_batched_tokens, max_tokens): every 8 to
    64, every 16 to 128, every 32 to 256, every 64 to 512, every 128 beyond, and the bound itself.
    Past 64 tokens a step pads by under a quarter of its tokens (below, its GEMMs read the weights
    once whatever the rows). Empty when the bound is under 2 (a mixed step has at least 2 tokens)."""
    top = min(max_num_batched_tokens, max_tokens)
    if top < 2:
        return []
    sizes = [*range(8, 65, 8), *range(80, 129, 16), *range(160, 257, 32), *range(320, 513, 64),
             *range(640, top + 1, 128)]
    sizes = [s for s in sizes if s <= top]
    if not sizes or sizes[-1] != top:
        sizes.append(top)
    return sorted(set(sizes))


class MixedGraphs:
    def __init__(
        self,
        model: Any,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = mixed_capture_sizes(max_num_batched_tokens, max_tokens)
        if not self.sizes:
            raise ValueError(f"no mixed-step size to capture under {min(max_num_batched_tokens, max_tokens)} tokens")
        n = self.max_tokens = self.sizes[-1]
        r = self.max_seqs = min(max_num_seqs, n)
        self.width = max_blocks_per_seq
        self.block_size = block_size
        pin = device.type == "cuda"
        # int64: [input_ids | positions | slot_mapping], n each
        self.i64 = torch.zeros(3 * n, dtype=torch.long, device=device)
        self.i64_host = torch.zeros(3 * n, dtype=torch.long, pin_memory=pin)
        # int32: [query_start_loc (r + 1) | seq_lens (r) | block_tables (r x width)]
        self.i32 = torch.zeros(2 * r + 1 + r * self.width, dtype=torch.int32, device=device)
        self.i32_host = torch.zeros(self.i32.numel(), dtype=torch.int32, pin_memory=pin)
        # Fixed offsets whatever the size: a graph of R' < r slots reads the first R' entries of
        # each region (its views are prefixes of these).
        self._i64_np = self.i64_host.numpy()
        i32 = self.i32_host.numpy()
        self._qsl_np, self._lens_np = i32[: r + 1], i32[r + 1 : 2 * r + 1]
        self._tables_np = i32[2 * r + 1 :].reshape(r, self.width)
        self.input_ids, self.positions, self.slot_mapping = self.i64.view(3, n)
        self.query_start_loc = self.i32[: r + 1]
        self.seq_lens = self.i32[r + 1 : 2 * r + 1]
        self.block_tables = self.i32[2 * r + 1 :].view(r, self.width)
        self.seq_lens.fill_(1)
        self.slot_mapping.fill_(-1)
        # Recorded after each load: the pinned buffers are rewritten only once their last copy ran.
        self._loaded = torch.cuda.Event() if device.type == "cuda" else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # size -> hidden [size, hidden_size]
        self.capture_seconds = 0.0
        self.num_replays = 0  # steps run from a graph (tests, stats)

    def seqs_for(self, size: int) -> int:
        """Request slots of the graph of `size` tokens."""
        return min(size, self.max_seqs)

    def size_for(self, num_tokens: int) -> int | None:
        for size in self.sizes:
            if size >= num_tokens:
                return size
        return None

    def fits(self, num_tokens: int, num_seqs: int, max_blocks: int) -> bool:
        return num_tokens <= self.max_tokens and num_seqs <= self.max_seqs and max_blocks <= self.width

    def metadata(self, size: int) -> AttentionMetadata:
        r = self.seqs_for(size)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: r + 1],
            seq_lens=self.seq_lens[:r],
            block_tables=self.block_tables[:r],
            max_query_len=size,  # > 1: the varlen kernel (the module docstring)
            max_seq_len=self.width * self.block_size,  # a bound of seq_lens (the varlen kernel ignores it)
        )

    def forward(self, size: int) -> torch.Tensor:
        """The model over the buffers' first `size` rows: hidden [size, hidden_size]."""
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self.metadata(size))

    def load(self, host: HostInputs) -> int:
        """Stage a step of T tokens in B requests (the caller checked `fits`, T >= 2) into the
        buffers; the size whose graph runs it."""
        num_tokens, batch = len(host.token_ids), len(host.seq_lens)
        size = self.size_for(num_tokens)
        assert size is not None and batch <= self.seqs_for(size)
        r, n = self.seqs_for(size), self.max_tokens
        if self._loaded is not None:
            self._loaded.synchronize()
        i64 = self._i64_np
        i64[:num_tokens] = host.token_ids
        i64[num_tokens:size] = 0
        i64[n : n + num_tokens] = host.positions
        i64[n + num_tokens : n + size] = 0
        i64[2 * n : 2 * n + num_tokens] = host.slots
        i64[2 * n + num_tokens : 2 * n + size] = -1
        qsl, lens, rows = self._qsl_np, self._lens_np, self._tables_np
        qsl[: batch + 1] = host.query_start_loc
        qsl[batch + 1 : r + 1] = num_tokens
        lens[:batch] = host.seq_lens
        lens[batch:r] = 1
        for i, table in enumerate(host.tables):
            rows[i, : len(table)] = table
        rows[batch:r, 0] = 0
        self.i64.copy_(self.i64_host, non_blocking=True)
        # query_start_loc and seq_lens whole, then the first r table rows
        used = 2 * self.max_seqs + 1 + r * self.width
        self.i32[:used].copy_(self.i32_host[:used], non_blocking=True)
        if self._loaded is not None:
            self._loaded.record()
        return size

    @torch.inference_mode()
    def capture(self, pool: Any) -> None:
        """Capture every size, largest first, into `pool` (shared with the decode graphs: replays
        never overlap, and each graph's output stays allocated)."""
        started = time.perf_counter()
        for size in reversed(self.sizes):
            self.graphs[size], self.outputs[size] = capture_graph(functools.partial(self.forward, size), pool)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        logger.info("captured %d mixed-step CUDA graphs (%d..%d tokens, up to %d requests) in %.1f s",
                    len(self.sizes), self.sizes[0], self.sizes[-1], self.max_seqs, self.capture_seconds)

    def run(self, host: HostInputs, fill: Callable[[torch.Tensor], object] | None = None) -> torch.Tensor:
        """Replay for the step's inputs: hidden [T, hidden_size], a view of the graph's output
        (valid until the next replay of that size; the caller's LM head and sampler are queued
        on the stream before it). `fill` edits the loaded input_ids before the replay (async
        scheduling: ids sampled by the step before, still on the device)."""
        size = self.load(host)
        if fill is not None:
            fill(self.input_ids)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.outputs[size][: len(host.token_ids)]
