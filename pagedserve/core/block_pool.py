"""Physical KV blocks: reference counts, the eviction-ordered free list and the prefix-cache map.

Every block is in exactly one of three states:

    in use     ref_cnt > 0, not in the free queue (shared blocks have ref_cnt > 1)
    cached     ref_cnt == 0, in the free queue, block_hash set, reachable from the hash map
    free       ref_cnt == 0, in the free queue, no hash

Allocation pops from the head of the free queue; a freed block goes to the tail. So unreferenced
cached blocks are evicted in LRU order, lazily: a cached block keeps its contents until the moment
it is handed out again, and a prefix hit on it just takes it out of the queue ("touch").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pagedserve.core.block_hash import BlockHash


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # intrusive links of the free queue (None when not in it)
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of blocks with O(1) append, popleft and removal from the middle."""

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels: head.next_free is the first block
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None and block.prev_free is None and block.next_free is None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not in the free queue"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def popleft(self) -> KVCacheBlock:
        first = self._head.next_free
        if first is None or first is self._tail:
            raise ValueError("no free KV cache blocks")
        self.remove(first)
        return first

    def __iter__(self):  # head (next evicted) to tail
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[int, KVCacheBlock] = {}  # BlockHash.value -> block

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now: free plus evictable cached ones."""
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.free_queue.num_free / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        block = self.cached_blocks.get(block_hash.value)
        if block is None or block.block_hash != block_hash:  # absent, or a 64-bit collision
            return None
        return block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on blocks found in the prefix cache."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def allocate(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > self.free_queue.num_free:
            raise ValueError(f"cannot allocate {num_blocks} blocks, {self.free_queue.num_free} free")
        out = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero join the queue's tail in the
        given order, so callers pass blocks in the order they should be evicted."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Register a full, computed block under its hash. When another block already holds the
        same content, this one stays uncached (the first copy serves future hits)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash.value in self.cached_blocks:
            return
        block.block_hash = block_hash
        self.cached_blocks[block_hash.value] = block

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_blocks.get(block.block_hash.value) is block:
            del self.cached_blocks[block.block_hash.value]
        block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is in use."""
        if self.free_queue.num_free != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()
        return True


class SwapSpace:
    """CPU blocks for swapped-out requests: a plain free list, no sharing and no caching."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise ValueError(f"cannot allocate {num_blocks} CPU blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(num_blocks)]

    def free(self, block_ids: Iterable[int]) -> None:
        self._free.extend(block_ids)
