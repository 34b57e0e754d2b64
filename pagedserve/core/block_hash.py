"""Chained hashes over full KV blocks, the keys of the prefix cache.

    tokens:  | t0 .. t15 | t16 .. t31 | t32 .. t40 (partial: never hashed)
    hashes:  h0 = H(None, t0..t15)
             h1 = H(h0,   t16..t31)

A block's hash covers its own tokens and, through its parent's hash, every token before it, so
equal hashes mean equal prefixes. A 64-bit hash can collide, so a hit is confirmed by comparing the
parent hash and the block's token ids as well (BlockHash equality); since lookups walk the chain
from the first block and stop at the first miss, the parent was itself confirmed.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import NamedTuple

import xxhash

_NO_PARENT_SEED = 0x5EED


class BlockHash(NamedTuple):
    value: int  # 64-bit xxh3 of (parent value, token ids): the dict key
    parent_value: int | None
    token_ids: tuple[int, ...]


def hash_block(parent: BlockHash | None, token_ids: list[int]) -> BlockHash:
    parent_value = parent.value if parent is not None else None
    hasher = xxhash.xxh3_64(seed=_NO_PARENT_SEED if parent_value is None else 0)
    if parent_value is not None:
        hasher.update(parent_value.to_bytes(8, "little"))
    hasher.update(array("q", token_ids).tobytes())
    return BlockHash(hasher.intdigest(), parent_value, tuple(token_ids))


def extend_block_hashes(
    block_hashes: list[BlockHash],
    token_ids_of: Callable[[int, int], list[int]],
    num_tokens: int,
    block_size: int,
) -> None:
    """Append hashes for every block that is full within the first num_tokens tokens.

    token_ids_of(start, end) returns the request's tokens [start, end)."""
    num_full = num_tokens // block_size
    parent = block_hashes[-1] if block_hashes else None
    for i in range(len(block_hashes), num_full):
        parent = hash_block(parent, token_ids_of(i * block_size, (i + 1) * block_size))
        block_hashes.append(parent)

