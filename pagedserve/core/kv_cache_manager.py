"""Per-request block tables on top of the block pool: allocation, prefix-cache lookup, fork, swap.

A request's block table maps logical block i (tokens [i*B, (i+1)*B), B = block_size) to a physical
block. Only full blocks are ever shared (prefix hits, forks); the block a request writes into is
always its own (ref_cnt == 1), which `allocate_slots` asserts, so copy-on-write reduces to copying
the one partial block at fork time.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.core.block_hash import extend_block_hashes
from pagedserve.core.block_pool import BlockPool, KVCacheBlock, SwapSpace
from pagedserve.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(
        self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int, enable_caching: bool
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_gpu_blocks, enable_caching)
        self.swap_space = SwapSpace(num_cpu_blocks)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}  # GPU block table per running request
        self.req_cpu_blocks: dict[str, list[int]] = {}  # CPU block table per swapped request
        # How many leading blocks of each request were already offered to the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_stats = PrefixCacheStats()

    # ---------------------------------------------------------------- queries

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str, start: int = 0) -> list[int]:
        """Physical ids of the request's blocks from logical block `start` on."""
        return [b.block_id for b in self.req_blocks.get(request_id, ())[start:]]

    def num_blocks_of(self, request_id: str) -> int:
        return len(self.req_blocks.get(request_id, ()))

    # ---------------------------------------------------------------- prefix cache

    def get_computed_blocks(self, request: Request) -> list[KVCacheBlock]:
        """Cached blocks matching the request's leading full blocks.

        At least one token is always left to compute, since the step that computes the last
        known token is the one that produces logits. Requests asking for prompt logprobs skip the
        cache: logprobs need the hidden states of every prompt position.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        bs = self.block_size
        extend_block_hashes(request.block_hashes, request.token_ids_range, request.num_tokens, bs,
                            request.cache_salt)
        max_hit_blocks = (request.max_computable_tokens - 1) // bs
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_computed_blocks(self, request: Request) -> None:
        """Register every full block whose tokens are all known and computed (called after a
        step's update). Under async scheduling the K/V of a block's last token may still be being
        written by the step in flight: any step that could read the block through a prefix hit is
        queued on the device after it, so it reads the block complete."""
        if not self.enable_caching:
            return
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        bs = self.block_size
        # computed tokens may run past the known ones (a pending token's position): hash only
        # blocks whose token ids are all known
        num_known = min(request.num_computed_tokens, request.num_tokens)
        num_full = num_known // bs
        first = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= first:
            return
        extend_block_hashes(request.block_hashes, request.token_ids_range, num_known, bs, request.cache_salt)
        for i in range(first, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = num_full

    # ---------------------------------------------------------------- allocation

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Make room for num_new_tokens more tokens after the computed ones (and after
        new_computed_blocks, prefix hits being adopted now). Returns the newly allocated blocks,
        or None, changing nothing, when the pool is too small."""
        hits = new_computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        bs = self.block_size
        num_tokens_after = request.num_computed_tokens + len(hits) * bs + num_new_tokens
        num_needed = cdiv(num_tokens_after, bs) - len(blocks) - len(hits)
        # Hits with ref_cnt 0 sit in the free queue: adopting them takes them out of it.
        num_hits_in_free_queue = sum(1 for b in hits if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_hits_in_free_queue:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        if hits:
            self.pool.touch(hits)
            blocks.extend(hits)
            self.prefix_stats.hits += len(hits) * bs
        new_blocks = self.pool.allocate(max(num_needed, 0))
        blocks.extend(new_blocks)
        first_written = (request.num_computed_tokens + len(hits) * bs) // bs
        assert all(b.ref_cnt == 1 for b in blocks[first_written:]), "writing into a shared block"
        return new_blocks

    def record_prefix_query(self, num_tokens: int) -> None:
        if self.enable_caching:
            self.prefix_stats.queries += num_tokens

    def free(self, request: Request) -> None:
        """Release the request's GPU and CPU blocks. Tail blocks are freed first so that they are
        evicted before the shared-prefix blocks at the head of the table."""
        self.num_cached_blocks.pop(request.request_id, None)
        blocks = self.req_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))
        cpu_blocks = self.req_cpu_blocks.pop(request.request_id, None)
        if cpu_blocks:
            self.swap_space.free(cpu_blocks)

    def fork(self, leader: Request, follower: Request) -> tuple[int, int] | None:
        """Give the follower the leader's computed prefix: full blocks are shared by reference,
        the partial last block (the only one the follower will write into) is copied.

        Returns the (src, dst) block copy for the worker, (-1, -1) when there is no partial
        block, or None when no block is free for the copy."""
        bs = self.block_size
        leader_blocks = self.req_blocks.get(leader.request_id, [])
        num_full = leader.num_computed_tokens // bs
        has_partial = leader.num_computed_tokens % bs != 0
        if has_partial and self.pool.num_free_blocks < 1:
            return None
        shared = leader_blocks[:num_full]
        self.pool.touch(shared)
        table = list(shared)
        copy = (-1, -1)
        if has_partial:
            [dst] = self.pool.allocate(1)
            copy = (leader_blocks[num_full].block_id, dst.block_id)
            table.append(dst)
        self.req_blocks[follower.request_id] = table
        follower.num_computed_tokens = leader.num_computed_tokens
        follower.block_hashes = list(leader.block_hashes[:num_full])
        return copy

    # ---------------------------------------------------------------- swap

    def can_swap_out(self, request: Request) -> bool:
        return self.swap_space.num_free_blocks >= self.num_blocks_of(request.request_id)

    def swap_out(self, request: Request) -> list[tuple[int, int]]:
        """Move the request's blocks to CPU blocks; returns (gpu, cpu) pairs to copy."""
        self.num_cached_blocks.pop(request.request_id, None)
        blocks = self.req_blocks.pop(request.request_id)
        cpu_blocks = self.swap_space.allocate(len(blocks))
        self.req_cpu_blocks[request.request_id] = cpu_blocks
        self.pool.free(reversed(blocks))
        return [(g.block_id, c) for g, c in zip(blocks, cpu_blocks)]

    def can_swap_in(self, request: Request, num_new_tokens: int) -> bool:
        num_needed = max(
            cdiv(request.num_computed_tokens + num_new_tokens, self.block_size),
            len(self.req_cpu_blocks[request.request_id]),
        )
        return self.pool.num_free_blocks >= num_needed

    def swap_in(self, request: Request) -> list[tuple[int, int]]:
        """Bring a swapped request back into fresh GPU blocks; returns (cpu, gpu) pairs."""
        cpu_blocks = self.req_cpu_blocks.pop(request.request_id)
        gpu_blocks = self.pool.allocate(len(cpu_blocks))
        self.req_blocks[request.request_id] = gpu_blocks
        self.swap_space.free(cpu_blocks)
        return [(c, g.block_id) for c, g in zip(cpu_blocks, gpu_blocks)]
