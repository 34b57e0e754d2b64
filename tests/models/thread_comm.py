"""A test-only in-process Communicator: one thread per rank, collectives over a Barrier.

    group = ThreadGroup(2)
    models = [build(ParallelGroup(r, 2, group.comm(r))) for r in range(2)]   # any thread
    outs = group.run(lambda rank: step(models[rank]))                        # one thread per rank

Every rank posts its tensor in its slot, waits for the others, computes the result from all
slots in rank order (so all ranks get bit-identical sums), and waits again before anyone may
post the next collective's tensor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


class ThreadGroup:
    def __init__(self, world_size: int, timeout: float = 60.0) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._slots: list[Tensor | None] = [None] * world_size
        self.calls: list[str] = []  # rank 0's collectives, in order

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def _exchange(self, rank: int, x: Tensor, combine: Callable[[list[Tensor]], Tensor]) -> Tensor:
        self._slots[rank] = x
        self._barrier.wait()
        result = combine([t for t in self._slots if t is not None])
        self._barrier.wait()
        return result

    def run(self, fn: Callable[[int], T]) -> list[T]:
        """fn(rank) on one thread per rank; the results in rank order (a rank's error re-raised)."""
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                with torch.no_grad():
                    results[rank] = fn(rank)
            except BaseException as exc:  # noqa: BLE001 (re-raised below, in the caller)
                errors.append(exc)
                self._barrier.abort()  # the other ranks stop waiting

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadComm:
    """pagedserve.model_executor.layers.context.Communicator over a ThreadGroup."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank

    def all_reduce(self, x: Tensor) -> Tensor:
        if self.rank == 0:
            self.group.calls.append("all_reduce")

        def total(parts: list[Tensor]) -> Tensor:
            out = parts[0].clone()
            for p in parts[1:]:
                out += p
            return out

        return self.group._exchange(self.rank, x, total)

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:
        if self.rank == 0:
            self.group.calls.append("all_gather")
        return self.group._exchange(self.rank, x, lambda parts: torch.cat(parts, dim=dim))
