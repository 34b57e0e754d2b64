"""A torch-free stand-in for the model side, used to test the scheduler and the KV cache manager.

SimWorker keeps its own per-request state from the SchedulerOutput diffs (as the model runner
does) and a simulated KV cache in which each slot holds the token id written there. Every step it
"computes" the scheduled tokens by writing their ids into their slots, then checks that every
position the attention would read (all positions < seq_len) holds that position's token. That
checks block tables, prefix-cache hits, forks, swaps and copies end to end without a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.config import CacheConfig, SchedulerConfig
from pagedserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagedserve.core.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams


@dataclass
class SimState:
    prompt: list[int]
    outputs: list[int]
    block_ids: list[int]
    num_computed: int
    params: SamplingParams

    def tokens(self) -> list[int]:
        return self.prompt + self.outputs


def next_token(state: SimState, vocab: int) -> int:
    """A deterministic 'model': the next token depends on the whole sequence."""
    return (sum(state.tokens()) * 31 + len(state.tokens()) * 7) % vocab


class SimWorker:
    def __init__(self, block_size: int, vocab: int = 1000) -> None:
        self.block_size = block_size
        self.vocab = vocab
        self.states: dict[str, SimState] = {}
        self.gpu: dict[int, int] = {}  # slot -> token id
        self.cpu: dict[int, int] = {}

    def _move(self, src: dict[int, int], dst: dict[int, int], mapping: list[tuple[int, int]]) -> None:
        bs = self.block_size
        for s, d in mapping:
            for off in range(bs):
                if s * bs + off in src:
                    dst[d * bs + off] = src[s * bs + off]
                else:
                    dst.pop(d * bs + off, None)

    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in plan.finished_req_ids:
            self.states.pop(req_id, None)
        for new in plan.scheduled_new_reqs:
            assert new.req_id not in self.states
            self.states[new.req_id] = SimState(
                list(new.prompt_token_ids), list(new.output_token_ids), list(new.block_ids),
                new.num_computed_tokens, new.sampling_params,
            )
        for cached in plan.scheduled_cached_reqs:
            state = self.states[cached.req_id]
            assert state.num_computed == cached.num_computed_tokens
            state.block_ids.extend(cached.new_block_ids)
        self._move(self.gpu, self.cpu, plan.blocks_to_swap_out)
        self._move(self.cpu, self.gpu, plan.blocks_to_swap_in)
        self._move(self.gpu, self.gpu, plan.blocks_to_copy)
        bs = self.block_size
        sampled: dict[str, int] = {}
        # write all new tokens first (as each layer does before attending), then read
        for req_id, num in plan.num_scheduled_tokens.items():
            state = self.states[req_id]
            tokens = state.tokens()
            start, end = state.num_computed, state.num_computed + num
            assert 0 < num and end <= len(tokens)
            assert len(state.block_ids) * bs >= end, "block table too short"
            for p in range(start, end):
                self.gpu[state.block_ids[p // bs] * bs + p % bs] = tokens[p]
        for req_id, num in plan.num_scheduled_tokens.items():
            state = self.states[req_id]
            tokens = state.tokens()
            end = state.num_computed + num
            for p in range(end):
                slot = state.block_ids[p // bs] * bs + p % bs
                assert self.gpu.get(slot) == tokens[p], f"{req_id}: wrong KV at position {p}"
            state.num_computed = end
            if end == len(tokens):
                token = next_token(state, self.vocab)
                state.outputs.append(token)
                sampled[req_id] = token
        return ModelRunnerOutput(sampled_token_ids=sampled)


def make_scheduler(
    num_gpu_blocks: int = 64,
    num_cpu_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    enable_prefix_caching: bool = True,
    preemption_mode: str = "recompute",
    policy: str = "fcfs",
    enable_chunked_prefill: bool = True,
    scheduler_cls: type[Scheduler] = Scheduler,  # AsyncScheduler for the async driving order
) -> Scheduler:
    cache = CacheConfig(
        block_size=block_size,
        gpu_memory_utilization=0.9,
        swap_space_bytes=0,
        enable_prefix_caching=enable_prefix_caching,
        kv_cache_memory_bytes=None,
        num_gpu_blocks_override=None,
        num_gpu_blocks=num_gpu_blocks,
        num_cpu_blocks=num_cpu_blocks,
    )
    sched = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=enable_chunked_prefill,
        preemption_mode=preemption_mode,
        policy=policy,
    )
    return scheduler_cls(sched, cache)


def check_accounting(scheduler: Scheduler) -> None:
    """free + used == total; ref counts equal the number of block tables holding each block;
    free-queue membership matches ref_cnt == 0; every cached hash maps to a block holding it."""
    kv = scheduler.kv
    pool = kv.pool
    holders: dict[int, int] = {}
    for blocks in kv.req_blocks.values():
        for block in blocks:
            holders[block.block_id] = holders.get(block.block_id, 0) + 1
    in_queue = {b.block_id for b in pool.free_queue}
    assert len(in_queue) == pool.free_queue.num_free
    for block in pool.blocks:
        assert block.ref_cnt == holders.get(block.block_id, 0), block
        assert (block.block_id in in_queue) == (block.ref_cnt == 0), block
    used = sum(1 for b in pool.blocks if b.ref_cnt > 0)
    assert used + pool.num_free_blocks == pool.num_blocks
    for value, block in pool.cached_blocks.items():
        assert block.block_hash is not None and block.block_hash.value == value
    cpu_used = sum(len(b) for b in kv.req_cpu_blocks.values())
    assert cpu_used + kv.swap_space.num_free_blocks == kv.swap_space.num_blocks
    # every request holding blocks is running; every swapped one holds CPU blocks only
    for req_id in kv.req_blocks:
        assert scheduler.requests[req_id] in scheduler.running, req_id
    for request in scheduler.swapped:
        assert request.request_id in kv.req_cpu_blocks
        assert request.request_id not in kv.req_blocks
    # pending tokens: only running requests have them (at most the step in flight's and the one
    # planned after it), and the newest pending token is never computed
    for request in scheduler.running:
        assert 0 <= request.num_pending <= 2, request
        assert request.num_computed_tokens == request.num_tokens + request.num_pending - 1 or (
            request.num_pending == 0 and request.num_computed_tokens < request.num_tokens
        ), request
    for request in scheduler.waiting:  # a pending token of a preempted one is on its way
        assert request.num_pending <= 1 and request.num_computed_tokens == 0, request
    for request in scheduler.swapped:
        assert request.num_pending <= 1, request
        assert request.num_computed_tokens == request.num_tokens + request.num_pending - 1 or (
            request.num_pending == 0 and request.num_computed_tokens < request.num_tokens
        ), request
