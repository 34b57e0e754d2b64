"""KV cache tensors on the device and in CPU swap space, their sizing, and block movement.

Sizing (determine_num_blocks), first match wins:
    num_gpu_blocks_override  ->  that many blocks
    kv_cache_memory_bytes    ->  budget // bytes_per_block
    CPU                      ->  what host memory holds after the weights (cpu_resources.py)
    GPU                      ->  profiled: the largest admitted step (profile_forward: the
                                 forward at max_num_batched_tokens, the LM head and the
                                 sampler's most expensive path on max_num_seqs rows), plus the
                                 CUDA-graph pool captured later (graph_pool_margin), under
                                 gpu_memory_utilization (profile_gpu_kv_budget)
    swap pool                ->  swap_space_bytes // bytes_per_block CPU blocks

Per layer, keys and values each live in one tensor of blocks:

    key_cache[layer]: [num_blocks, block_size, num_kv_heads, head_dim]

    token at position p of a request  ->  slot = block_table[p // block_size] * block_size
                                                 + p % block_size
    key_cache.view(-1, num_kv_heads, head_dim)[slot] holds its key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pagedserve.model_executor.layers.attention import AttentionMetadata
from pagedserve.model_executor.layers.linear import kv_heads_per_rank
from pagedserve.model_executor.model_spec import ModelSpec
from pagedserve.worker.cpu_resources import (
    check_host_pools_fit,
    cpu_kv_cache_blocks,
    mem_available_bytes,
    module_bytes,
)
from pagedserve.worker.cuda_graphs import capture_sizes
from pagedserve.worker.mixed_graphs import mixed_capture_sizes

if TYPE_CHECKING:
    from pagedserve.config import EngineConfig, SchedulerConfig

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def from_model_spec(cls, spec: ModelSpec, block_size: int, dtype: torch.dtype,
                        tp_size: int = 1) -> KVCacheSpec:
        """Sized by the model spec (our names: a ChatGLM `num_layers` / `multi_query_group_num`
        config yields the same fields as a Llama one), for one of `tp_size` tensor-parallel ranks:
        each holds kv_heads / tp of the KV heads, or one (replicated) when there are fewer."""
        num_kv_heads = kv_heads_per_rank(spec.num_kv_heads, tp_size)  # as QKVParallelLinear splits them
        return cls(spec.num_layers, num_kv_heads, spec.head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        """Keys and values of one block across all layers."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        per_layer = self.block_size * self.num_kv_heads * self.head_dim * element_size
        return 2 * self.num_layers * per_layer


def allocate_kv_cache(
    spec: KVCacheSpec, num_blocks: int, device: torch.device, pin_memory: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    caches = []
    for _ in range(spec.num_layers):
        key = torch.zeros(shape, dtype=spec.dtype, device=device, pin_memory=pin_memory)
        value = torch.zeros(shape, dtype=spec.dtype, device=device, pin_memory=pin_memory)
        caches.append((key, value))
    return caches


def move_blocks(
    src: list[tuple[torch.Tensor, torch.Tensor]],
    dst: list[tuple[torch.Tensor, torch.Tensor]],
    mapping: list[tuple[int, int]],
) -> None:
    """Copy blocks src[i] -> dst[j] for each (i, j), in every layer (swap out/in, fork copy).

    One gather + one scatter per tensor: index_select on the source, index_copy_ into the
    destination (which may be on another device).
    """
    if not mapping:
        return
    src_device = src[0][0].device
    dst_device = dst[0][0].device
    src_idx = torch.tensor([s for s, _ in mapping], dtype=torch.long, device=src_device)
    dst_idx = torch.tensor([d for _, d in mapping], dtype=torch.long, device=dst_device)
    # Into CPU memory the copy must block: index_copy_ on the CPU would otherwise read the staging
    # tensor before the device finished writing it. Towards the device, stream order suffices.
    non_blocking = dst_device.type != "cpu"
    for (src_k, src_v), (dst_k, dst_v) in zip(src, dst):
        for s_tensor, d_tensor in ((src_k, dst_k), (src_v, dst_v)):
            blocks = s_tensor.index_select(0, src_idx).to(dst_device, non_blocking=non_blocking)
            d_tensor.index_copy_(0, dst_idx, blocks)


def log_kv_pools(
    spec: KVCacheSpec, device_type: str, num_blocks: int, num_swap_blocks: int, sizing: str,
    preemption_mode: str,
) -> None:  # fmt: skip
    """One start-up line per pool: what it holds, where, and the memory it takes."""
    bpb, block_size = spec.bytes_per_block, spec.block_size
    where = "CPU" if device_type == "cpu" else "GPU"
    logger.info(
        "KV cache: %d %s blocks of %d tokens (%d tokens), %.1f MiB of %s memory (%s)",
        num_blocks, where, block_size, num_blocks * block_size, num_blocks * bpb / 2**20, where, sizing,
    )  # fmt: skip
    if num_swap_blocks:
        logger.info(
            "swap pool: %d CPU blocks (%d tokens), %.1f MiB of %s CPU memory (--swap-space)",
            num_swap_blocks, num_swap_blocks * block_size, num_swap_blocks * bpb / 2**20,
            "pinned" if device_type == "cuda" else "plain",
        )  # fmt: skip
    elif preemption_mode != "swap":
        logger.info("swap pool: none (preemption mode %s recomputes preempted requests; "
                    "--preemption-mode swap allocates --swap-space)", preemption_mode)  # fmt: skip
    else:
        logger.info("swap pool: none (--swap-space holds no block): preempted requests are recomputed")


def num_blocks_from_budget(budget_bytes: int, spec: KVCacheSpec) -> int:
    return max(int(budget_bytes // spec.bytes_per_block), 0)


class CudaMemory:
    """The allocator statistics the profile reads (a test substitutes a recording fake)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def reserved(self) -> int:
        return int(torch.cuda.memory_reserved(self.device))

    def free_total(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)


def used_device_memory(device: torch.device) -> int:
    """Bytes of the device in use now, by every process (total - free)."""
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


def profile_gpu_kv_budget(
    run_peak_forward: Callable[[], None], gpu_memory_utilization: float, device: torch.device,
    run_graph_step: Callable[[], int] | None = None, memory: Any = None, baseline_used: int = 0,
) -> int:  # fmt: skip
    """Bytes left for the KV cache after the largest step, under the utilisation cap.

    budget = total * utilization - (peak torch allocation during the pass
                                    + memory this engine holds outside torch's allocator:
                                      cuBLAS workspaces, NCCL, Triton
                                    + the CUDA-graph pool, captured after the KV cache)

    utilization is this engine's share of the device, as in vLLM: two engines at 0.45 each
    share one GPU. baseline_used: bytes in use on the device before this engine loaded anything
    (used_device_memory at start: other processes, and this process's CUDA context), which are
    not this engine's. The KV cache must also fit in what is free now: when other processes hold
    more than the rest of the device, that is a start-up error naming them.

    run_graph_step (CUDA graphs on): runs the decode step at max_num_seqs eagerly and returns the
    pool's estimate (graph_pool_margin) from its measured peak.
    """
    mem = memory if memory is not None else CudaMemory(device)
    mem.reset_peak()
    run_peak_forward()
    peak_torch = mem.peak()
    graph_pool = 0
    if run_graph_step is not None:
        graph_pool = run_graph_step()
    free, total = mem.free_total()
    non_torch = (total - free) - baseline_used - mem.reserved()
    budget = int(total * gpu_memory_utilization) - peak_torch - max(non_torch, 0) - graph_pool
    logger.info(
        "memory profile: total %.2f GiB, peak torch %.2f GiB, non-torch %.2f GiB, CUDA-graph pool "
        "%.2f GiB, KV budget %.2f GiB", total / 2**30, peak_torch / 2**30, non_torch / 2**30,
        graph_pool / 2**30, budget / 2**30,
    )  # fmt: skip
    if budget <= 0:
        raise RuntimeError(
            f"this configuration does not fit in GPU memory: the largest step needs "
            f"{peak_torch / 2**30:.2f} GiB at its peak (weights, activations at "
            f"max_num_batched_tokens, logits and sampler buffers at max_num_seqs) and the CUDA "
            f"graphs {graph_pool / 2**30:.2f} GiB, leaving {budget / 2**30:.2f} GiB for the KV cache "
            f"under gpu_memory_utilization {gpu_memory_utilization}: raise gpu_memory_utilization, "
            f"lower max_num_seqs / max_num_batched_tokens / max_model_len, or use enforce_eager"
        )
    # what is still to be allocated (the KV cache, then the graph pool) must be free now, beside
    # what torch keeps cached for this engine (reused first)
    room = free + (mem.reserved() - mem.allocated())
    if budget + graph_pool > room:
        others = max(baseline_used, 0)
        raise RuntimeError(
            f"gpu_memory_utilization {gpu_memory_utilization} gives this engine a KV cache of "
            f"{budget / 2**30:.2f} GiB, but only {room / 2**30:.2f} GiB of the GPU is free "
            f"({others / 2**30:.2f} GiB were in use before this engine started, by other processes "
            f"or this one's CUDA context): lower gpu_memory_utilization, or free the GPU"
        )
    return budget


def _dense_metadata(n: int, device: torch.device) -> AttentionMetadata:
    """n tokens as one dense sequence with no cache: the same per-token activations as n decodes
    or a mixed step of n tokens (attention over n keys is, if anything, larger), in one SDPA call
    (dense_causal_attention loops over sequences)."""
    return AttentionMetadata(
        slot_mapping=torch.full((n,), -1, dtype=torch.long, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.zeros((1, 1), dtype=torch.int32, device=device),
        max_query_len=n,
        max_seq_len=n,
    )


@torch.inference_mode()
def graph_pool_margin(model: Any, max_num_seqs: int, device: torch.device, memory: Any = None,
                      mixed_sizes: Sequence[int] = ()) -> int:  # fmt: skip
    """Bytes the CUDA graphs will hold: the decode graphs (cuda_graphs.py), measured on an eager
    decode step of max_num_seqs rows, and the mixed-step graphs of `mixed_sizes` tokens
    (mixed_graphs.py; none when empty), measured on an eager forward of the largest. All share one
    pool and each kind is captured largest first: the pool keeps the larger working memory of the
    two largest steps (each measured as its peak above the baseline) and, since every graph's
    outputs stay alive, the outputs of every other size: hidden state and argmax rows of the
    decode sizes, hidden rows of the mixed sizes. The float32 logits of all decode sizes share one
    buffer of max_num_seqs rows (DecodeGraphs.logits_out), which the largest step's peak holds.

        margin = max(peak(decode at max), peak(mixed at max))
                 + sum over smaller decode sizes s of s * (bytes of one hidden + argmax row)
                 + sum over smaller mixed sizes s of s * (bytes of one hidden row)
    """
    mem = memory if memory is not None else CudaMemory(device)
    n = max_num_seqs
    ids = torch.zeros(n, dtype=torch.long, device=device)
    positions = torch.zeros_like(ids)  # any position is valid whatever max_model_len is
    mem.reset_peak()
    base = mem.allocated()
    hidden = model(ids, positions, [], _dense_metadata(n, device))
    logits = model.compute_logits(hidden)
    greedy = logits.argmax(dim=-1)
    step = mem.peak() - base
    row_bytes = sum(t.element_size() * (t.numel() // n) for t in (hidden, greedy))
    hidden_row = hidden.element_size() * (hidden.numel() // n)
    del hidden, logits, greedy
    margin = sum(s * row_bytes for s in capture_sizes(n)[:-1])
    if mixed_sizes:
        m = max(mixed_sizes)
        mem.reset_peak()
        base = mem.allocated()
        ids = torch.zeros(m, dtype=torch.long, device=device)
        model(ids, torch.zeros_like(ids), [], _dense_metadata(m, device))
        step = max(step, mem.peak() - base)
        margin += sum(s * hidden_row for s in sorted(mixed_sizes)[:-1])
    return step + margin


Sample = Callable[[torch.Tensor], None]  # logits [max_num_seqs, vocab] float32 -> the sampler


def determine_num_blocks(
    config: EngineConfig, spec: KVCacheSpec, model: Any, device: torch.device, vocab_size: int,
    sample: Sample | None = None, baseline_used: int = 0,
) -> tuple[int, int, str]:  # fmt: skip
    """(device blocks, CPU swap blocks, how the device pool was sized: for the start-up log).
    `sample` runs the sampler's most expensive path in the profile (StepSampler.profile);
    baseline_used: device bytes in use before the engine loaded (profile_gpu_kv_budget).
    EngineCore checks that max_model_len fits."""
    cache = config.cache_config
    sched = config.scheduler_config
    on_cpu = device.type == "cpu"
    available = mem_available_bytes()
    if on_cpu and available is not None:  # tensor-parallel ranks on one host share its memory
        available //= config.parallel_config.world_size
    if cache.num_gpu_blocks_override is not None:
        num_gpu, sizing = cache.num_gpu_blocks_override, "num_gpu_blocks_override"
    elif cache.kv_cache_memory_bytes is not None:
        num_gpu = num_blocks_from_budget(cache.kv_cache_memory_bytes, spec)
        sizing = "the explicit KV cache budget"
    elif on_cpu:
        cpu_sizing = cpu_kv_cache_blocks(
            spec.bytes_per_block, spec.block_size, sched.max_num_seqs,
            sched.max_model_len, available, module_bytes(model),
        )  # fmt: skip
        num_gpu, sizing = cpu_sizing.num_blocks, cpu_sizing.describe()
    else:
        mixed = mixed_capture_sizes(sched.max_num_batched_tokens, config.mixed_graph_max_tokens)
        graphs = None if config.enforce_eager else (
            lambda: graph_pool_margin(model, sched.max_num_seqs, device, mixed_sizes=mixed))
        budget = profile_gpu_kv_budget(
            lambda: profile_forward(model, sched, vocab_size, device, sample),
            cache.gpu_memory_utilization, device, run_graph_step=graphs, baseline_used=baseline_used,
        )  # fmt: skip
        num_gpu = num_blocks_from_budget(budget, spec)
        sizing = f"profiled under gpu_memory_utilization {cache.gpu_memory_utilization}"
    num_cpu = num_blocks_from_budget(cache.swap_space_bytes, spec)
    if num_gpu < 1:
        raise ValueError("the KV cache budget holds no block; give it more memory")
    check_host_pools_fit((num_cpu + (num_gpu if on_cpu else 0)) * spec.bytes_per_block, available)
    return num_gpu, num_cpu, sizing


@torch.inference_mode()
def profile_forward(model: Any, sched: SchedulerConfig, vocab_size: int, device: torch.device,
                    sample: Sample | None = None) -> None:
    """The largest step the scheduler can plan: max_num_batched_tokens tokens, split into
    sequences of at most max_model_len, with no KV cache (dense attention), then the LM head on
    the max_num_seqs rows that sample (float32 logits, as the runner computes only those) and the
    sampler's most expensive path on them (`sample`; a softmax when none is given). The forward's
    activations are freed before the LM head, as in a real step; `hidden` stays alive."""
    num_tokens = sched.max_num_batched_tokens
    seq_len = min(num_tokens, sched.max_model_len)
    lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
    input_ids = torch.randint(0, vocab_size, (num_tokens,), device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    qsl = torch.tensor([0] + lens, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=device),
        query_start_loc=qsl,
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros((len(lens), 1), dtype=torch.int32, device=device),
        max_query_len=max(lens),
        max_seq_len=max(lens),
    )
    hidden = model(input_ids, positions, [], meta)
    rows = min(sched.max_num_seqs, num_tokens)
    logits = model.compute_logits(hidden[-rows:]).float()  # [rows, vocab]
    if sample is None:
        torch.softmax(logits, dim=-1)
    else:
        sample(logits.zero_())  # flat logits: the sampler's worst case (see StepSampler.profile)
