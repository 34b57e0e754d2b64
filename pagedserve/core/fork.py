"""n > 1 forking, the scheduler's part (a mixin of Scheduler): a user request with n samples is
a leader that computes the shared prompt with its followers attached (core/request.py); once the
leader has computed every prompt token but the last, the followers fork from it:

    leader   [p0 p1 p2 p3][p4 p5 p6 .]     blocks 7, 9     (p7, the last prompt token, not computed)
    follower [shared 7   ][copy of 9 ]     block 7 ref count 2; block 9 copied into a fresh block
                                           (blocks_to_copy) when the prefix ends mid-block

so every child computes the last prompt token itself and samples from its own generator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from pagedserve.core.kv_cache_manager import KVCacheManager


class LeaderForks:
    """Needs of the Scheduler it is mixed into (declared for the type checker)."""

    running: list[Request]
    waiting: list[Request]
    kv: KVCacheManager
    block_size: int
    _max_seqs: int
    _copies: list[tuple[int, int]]  # (src, dst) block copies planned for this step

    def _pick_victim(self) -> Request:
        raise NotImplementedError

    def _preempt(self, victim: Request, force_recompute: bool = False) -> int:
        raise NotImplementedError

    def _insert_by_rank(self, queue: list[Request], request: Request) -> None:
        raise NotImplementedError

    def _fork_ready_leaders(self) -> None:
        """A leader that has computed all prompt tokens but the last hands its prefix to its
        followers, once there are seats for them and a block for each partial-block copy;
        lower-ranked running requests are preempted to make room. When only the leader itself
        is left to preempt, the followers that fit fork now and the rest are detached into the
        waiting queue as requests of their own (they recompute the prompt, helped by the prefix
        cache), so a leader never waits on room that cannot appear."""
        for leader in list(self.running):
            if leader.status != RequestStatus.RUNNING or not leader.followers:
                continue
            if leader.num_computed_tokens < leader.max_computable_tokens:
                continue
            needs_copy = leader.num_computed_tokens % self.block_size != 0
            while (
                len(self.running) + len(leader.followers) > self._max_seqs
                or (needs_copy and self.kv.pool.num_free_blocks < len(leader.followers))
            ):
                victim = self._pick_victim()
                if victim is leader:
                    seats = self._max_seqs - len(self.running)
                    fit = min(seats, self.kv.pool.num_free_blocks if needs_copy else seats)
                    self._fork(leader, max(fit, 0))
                    break
                self._preempt(victim)
            else:
                self._fork(leader, len(leader.followers))

    def _fork(self, leader: Request, num_forked: int) -> None:
        """Fork the first num_forked followers from the leader; detach the others."""
        for follower in leader.followers[num_forked:]:
            follower.leader = None
            follower.status = RequestStatus.WAITING
            self._insert_by_rank(self.waiting, follower)
        for follower in leader.followers[:num_forked]:
            copy = self.kv.fork(leader, follower)
            assert copy is not None
            self._copies.append(copy)
            follower.status = RequestStatus.RUNNING
            follower.leader = None
            follower.num_cached_tokens = leader.num_cached_tokens
            follower.first_scheduled_time = leader.first_scheduled_time
            self.running.append(follower)
        leader.followers = []
