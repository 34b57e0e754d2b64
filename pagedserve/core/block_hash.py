"""Chained hashes over full KV blocks, the keys of the prefix cache.

    tokens:  | t0 .. t15 | t16 .. t31 | t32 .. t40 (partial: never hashed)
    hashes:  h0 = H(None, t0..t15)
             h1 = H(h0,   t16..t31)

A block's hash covers its own tokens and, through its parent's hash, every token before it, so
equal hashes mean equal prefixes. A 64-bit hash can collide, so a hit is confirmed by comparing the
parent hash and the block's token ids as well (BlockHash equality); since lookups walk the chain
from the first block and stop at the first miss, the parent was itself confirmed.

A cache salt (vLLM's per-request `cache_salt`; the server gives each tenant its own) enters the
first block only: h0 = H(None, salt, t0..t15). Every later hash chains through h0, so requests
with different salts share no block, and the salt string itself is part of h0's BlockHash, so a
hit is confirmed against it too. No salt gives exactly the unsalted hashes above.
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
    salt: str | None = None  # the cache salt, on a first block (parent_value None) only


def hash_block(parent: BlockHash | None, token_ids: list[int], salt: str | None = None) -> BlockHash:
    """`salt` is used for a first block (parent None) and ignored for the others, which inherit
    it through their parent's value."""
    parent_value = parent.value if parent is not None else None
    hasher = xxhash.xxh3_64(seed=_NO_PARENT_SEED if parent_value is None else 0)
    if parent_value is not None:
        hasher.update(parent_value.to_bytes(8, "little"))
        salt = None
    elif salt is not None:
        # length-prefixed, so that no salt is a prefix-extension of another salt + tokens
        data = salt.encode("utf-8")
        hasher.update(len(data).to_bytes(8, "little") + data)
    hasher.update(array("q", token_ids).tobytes())
    return BlockHash(hasher.intdigest(), parent_value, tuple(token_ids), salt)


def extend_block_hashes(
    block_hashes: list[BlockHash],
    token_ids_of: Callable[[int, int], list[int]],
    num_tokens: int,
    block_size: int,
    salt: str | None = None,
) -> None:
    """Append hashes for every block that is full within the first num_tokens tokens.

    token_ids_of(start, end) returns the request's tokens [start, end); salt: the request's cache
    salt (it enters the first block's hash)."""
    num_full = num_tokens // block_size
    parent = block_hashes[-1] if block_hashes else None
    for i in range(len(block_hashes), num_full):
        parent = hash_block(parent, token_ids_of(i * block_size, (i + 1) * block_size), salt)
        block_hashes.append(parent)

