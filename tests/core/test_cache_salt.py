"""Cache salts (vLLM's per-request cache_salt): only requests with the same salt share blocks."""

from __future__ import annotations

from pagedserve.core.block_hash import hash_block
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.sampling_params import SamplingParams


def make_request(req_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(req_id, tokens, SamplingParams(), eos_token_id=None, cache_salt=salt)


def cached_manager(tokens: list[int], salt: str | None) -> KVCacheManager:
    kv = KVCacheManager(num_gpu_blocks=10, num_cpu_blocks=0, block_size=4, enable_caching=True)
    a = make_request("a", tokens, salt)
    assert kv.allocate_slots(a, len(tokens)) is not None
    a.num_computed_tokens = len(tokens)
    kv.cache_computed_blocks(a)
    return kv


def test_salt_enters_the_first_block_only_and_no_salt_is_the_unsalted_hash() -> None:
    plain = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4], None) == plain
    salted = hash_block(None, [1, 2, 3, 4], "tenant-a")
    assert salted.value != plain.value and salted != plain and salted.salt == "tenant-a"
    assert hash_block(None, [1, 2, 3, 4], "tenant-b").value != salted.value
    # later blocks ignore the salt argument: they inherit it through the parent's value
    assert hash_block(salted, [5, 6, 7, 8], "x") == hash_block(salted, [5, 6, 7, 8])
    assert hash_block(salted, [5, 6, 7, 8]).value != hash_block(plain, [5, 6, 7, 8]).value


def test_same_salt_hits_other_salt_and_no_salt_miss() -> None:
    tokens = list(range(12))
    kv = cached_manager(tokens, "tenant-a")
    assert [b.block_id for b in kv.get_computed_blocks(make_request("b", tokens, "tenant-a"))] == [0, 1]
    assert kv.get_computed_blocks(make_request("c", tokens, "tenant-b")) == []
    assert kv.get_computed_blocks(make_request("d", tokens)) == []


def test_unsalted_requests_still_share() -> None:
    tokens = list(range(9))
    kv = cached_manager(tokens, None)
    assert [b.block_id for b in kv.get_computed_blocks(make_request("b", tokens))] == [0, 1]
    assert kv.get_computed_blocks(make_request("c", tokens, "s")) == []


def test_a_forged_value_with_another_salt_is_not_a_hit() -> None:
    """A 64-bit collision between two salts' first blocks is still told apart by the salt."""
    kv = cached_manager(list(range(8)), "tenant-a")
    real = hash_block(None, [0, 1, 2, 3], "tenant-a")
    forged = real._replace(salt="tenant-b")  # same dict key, other salt
    assert kv.pool.get_cached_block(real) is not None
    assert kv.pool.get_cached_block(forged) is None
