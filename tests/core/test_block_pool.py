"""Block pool and KV cache manager: exact block ids, eviction order, prefix hits, fork, swap."""

from __future__ import annotations

import pytest

from pagedserve.core.block_hash import hash_block
from pagedserve.core.block_pool import BlockPool, SwapSpace
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.sampling_params import SamplingParams


def make_request(req_id: str, tokens: list[int], **params: object) -> Request:
    return Request(req_id, tokens, SamplingParams(**params), eos_token_id=None)  # type: ignore[arg-type]


def test_allocate_hands_out_lowest_ids_then_lru_order() -> None:
    pool = BlockPool(6, enable_caching=True)
    first = pool.allocate(3)
    assert [b.block_id for b in first] == [0, 1, 2]
    pool.free([first[2], first[1], first[0]])  # freed tail first
    # queue now: 3 4 5 2 1 0
    assert [b.block_id for b in pool.free_queue] == [3, 4, 5, 2, 1, 0]
    assert [b.block_id for b in pool.allocate(4)] == [3, 4, 5, 2]
    assert pool.num_free_blocks == 2


def test_cached_block_is_evicted_lazily_and_hit_removes_it_from_queue() -> None:
    pool = BlockPool(3, enable_caching=True)
    [a, b, c] = pool.allocate(3)
    h_a = hash_block(None, [1, 2])
    h_b = hash_block(h_a, [3, 4])
    pool.cache_block(a, h_a)
    pool.cache_block(b, h_b)
    pool.free([c, b, a])  # queue: c b a
    assert pool.get_cached_block(h_a) is a and pool.get_cached_block(h_b) is b
    pool.touch([a])  # a prefix hit: a leaves the queue
    assert [x.block_id for x in pool.free_queue] == [c.block_id, b.block_id]
    [x, y] = pool.allocate(2)  # takes c, then b, evicting b's hash
    assert (x, y) == (c, b)
    assert pool.get_cached_block(h_b) is None
    assert pool.get_cached_block(h_a) is a


def test_hash_hit_is_confirmed_by_token_ids() -> None:
    pool = BlockPool(2, enable_caching=True)
    [a, _] = pool.allocate(2)
    real = hash_block(None, [5, 6])
    pool.cache_block(a, real)
    forged = real._replace(token_ids=(5, 7))  # same 64-bit value, other tokens: a collision
    assert pool.get_cached_block(forged) is None
    assert pool.get_cached_block(real) is a


def test_duplicate_content_keeps_first_block_cached() -> None:
    pool = BlockPool(2, enable_caching=True)
    [a, b] = pool.allocate(2)
    h = hash_block(None, [1, 1])
    pool.cache_block(a, h)
    pool.cache_block(b, h)
    assert pool.get_cached_block(h) is a and b.block_hash is None


def test_swap_space_round_trip() -> None:
    swap = SwapSpace(4)
    ids = swap.allocate(3)
    assert ids == [0, 1, 2]
    with pytest.raises(ValueError):
        swap.allocate(2)
    swap.free(ids)
    assert swap.num_free_blocks == 4


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(num_gpu_blocks=10, num_cpu_blocks=0, block_size=4, enable_caching=True)
    a = make_request("a", list(range(12)))  # exactly 3 full blocks
    assert kv.allocate_slots(a, 12) is not None
    a.num_computed_tokens = 12
    kv.cache_computed_blocks(a)
    b = make_request("b", list(range(12)))
    hits = kv.get_computed_blocks(b)
    # the last token must be computed, so only 2 of the 3 identical blocks are hits
    assert [h.block_id for h in hits] == [0, 1]
    new = kv.allocate_slots(b, 4, hits)
    assert new is not None and [x.block_id for x in new] == [3]
    assert kv.block_ids("b") == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.pool.blocks[:4]] == [2, 2, 1, 1]


def test_prompt_logprobs_requests_skip_the_cache() -> None:
    kv = KVCacheManager(num_gpu_blocks=10, num_cpu_blocks=0, block_size=4, enable_caching=True)
    a = make_request("a", list(range(9)))
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_computed_blocks(a)
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) != []
    assert kv.get_computed_blocks(make_request("c", list(range(9)), prompt_logprobs=1)) == []


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    kv = KVCacheManager(num_gpu_blocks=10, num_cpu_blocks=0, block_size=4, enable_caching=False)
    leader = make_request("0_x", list(range(11)))
    kv.allocate_slots(leader, 10)
    leader.num_computed_tokens = 10  # blocks 0,1 full; block 2 holds 2 tokens
    follower = make_request("1_x", list(range(11)))
    assert kv.fork(leader, follower) == (2, 3)
    assert kv.block_ids("1_x") == [0, 1, 3]
    assert follower.num_computed_tokens == 10
    assert [b.ref_cnt for b in kv.pool.blocks[:4]] == [2, 2, 1, 1]


def test_swap_out_and_in_moves_every_block() -> None:
    kv = KVCacheManager(num_gpu_blocks=6, num_cpu_blocks=4, block_size=4, enable_caching=False)
    r = make_request("r", list(range(10)))
    kv.allocate_slots(r, 10)
    r.num_computed_tokens = 10
    assert kv.swap_out(r) == [(0, 0), (1, 1), (2, 2)]
    assert kv.pool.num_free_blocks == 6 and kv.swap_space.num_free_blocks == 1
    assert kv.can_swap_in(r, 1)
    assert kv.swap_in(r) == [(0, 3), (1, 4), (2, 5)]  # never-used blocks come before freed ones
    assert kv.swap_space.num_free_blocks == 4


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_gpu_blocks=2, num_cpu_blocks=0, block_size=4, enable_caching=False)
    r = make_request("r", list(range(12)))
    assert kv.allocate_slots(r, 12) is None
    assert kv.pool.num_free_blocks == 2 and "r" not in kv.req_blocks
