"""The engine's side of structured outputs: a request whose grammar is not ready waits here, not
in the scheduler, while a background thread makes the grammar ready; every other request keeps
stepping meanwhile.

    add(request, serialized)
      grammar in the cache      -> ready now: the caller hands the request to the scheduler
      else                      -> held; one background job per spec digest:
                                   deserialize what the front end compiled (the usual case), or
                                   compile here when nothing was shipped (or it does not load)
    take_ready() (each step)    -> held requests whose job is done: to the scheduler, or failed

xgrammar releases the GIL while it compiles and deserializes (measured: a ticker thread keeps
~90% of its ticks during either), so a thread is enough here: the step loop is never blocked.
The deadline on compile time is the front end's (a killable process, grammar_pool.py); what
arrives here has already compiled once within it.

Each live request pins its grammar in the cache, released when the request finishes or is aborted.

The matchers live here too, on the engine core's side (with the tokenizer the cache was built
from), so the worker needs neither: per step, after schedule(),

    fill_bitmask(plan)   one bitmask row per structured request that samples this step (its
                         matcher built from the cache on its first sampling step, replaying the
                         tokens it generated before) -> plan.grammar, applied by the worker
    accept(sampled)      each such request's sampled token advances its matcher

A matcher outlives preemption (the request keeps its tokens), so it is never rebuilt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pagedserve.core.outputs import GrammarOutput, SchedulerOutput
from pagedserve.core.request import Request
from pagedserve.structured_output import GrammarCompilerCache, spec_digest

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Held:
    request: Request
    digest: str
    future: Future[Any]


@dataclass(slots=True)
class EngineGrammars:
    # (is_pinned) -> the cache; called once, on the first structured request (in the background
    # thread, or in the caller's for the offline engine's compile)
    make_cache: Callable[[Callable[[str], bool]], GrammarCompilerCache]
    _cache: GrammarCompilerCache | None = None
    _cache_lock: threading.Lock = field(default_factory=threading.Lock)
    _executor: ThreadPoolExecutor | None = None
    _jobs: dict[str, Future[Any]] = field(default_factory=dict)  # digest -> job in progress
    _held: dict[str, _Held] = field(default_factory=dict)  # request id -> held request
    _pinned: dict[str, str] = field(default_factory=dict)  # request id -> digest
    _live: dict[str, Request] = field(default_factory=dict)  # request id -> structured request
    _matchers: dict[str, Any] = field(default_factory=dict)  # request id -> xgrammar GrammarMatcher
    _pin_counts: dict[str, int] = field(default_factory=dict)  # digest -> live requests using it
    _pin_lock: threading.Lock = field(default_factory=threading.Lock)  # the cache reads pins too

    def cache(self) -> GrammarCompilerCache:
        with self._cache_lock:
            if self._cache is None:
                self._cache = self.make_cache(self._is_pinned)
            return self._cache

    @property
    def num_waiting(self) -> int:
        return len(self._held)

    def add(self, request: Request, serialized: str | None = None) -> bool:
        """Pin the grammar of `request` (and of its followers); True when it is ready now, else
        the request is held until take_ready() returns it."""
        spec = request.sampling_params.structured_outputs
        if spec is None:
            return True
        digest = spec_digest(spec)
        for child in [request, *request.followers]:
            self._pin(child, digest)
        if self._cache is not None and self._cache.get(digest) is not None:
            return True
        job = self._jobs.get(digest)
        if job is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedserve-grammar")
            job = self._executor.submit(self._prepare, spec, digest, serialized)
            self._jobs[digest] = job
        self._held[request.request_id] = _Held(request, digest, job)
        return False

    def _prepare(self, spec: Any, digest: str, serialized: str | None) -> None:
        cache = self.cache()
        if serialized is not None:
            try:
                cache.load(digest, serialized)
                return
            except Exception:  # noqa: BLE001 - e.g. another tokenizer's grammar: compile it here
                logger.warning("a shipped grammar did not load; compiling it in the engine", exc_info=True)
        cache.compile(spec)

    def take_ready(self) -> tuple[list[Request], list[tuple[Request, str]]]:
        """(held requests now ready, (held request, error) of those whose grammar failed)."""
        ready: list[Request] = []
        failed: list[tuple[Request, str]] = []
        for req_id, held in list(self._held.items()):
            if not held.future.done():
                continue
            del self._held[req_id]
            if self._jobs.get(held.digest) is held.future:
                del self._jobs[held.digest]
            error = held.future.exception()
            if error is None:
                ready.append(held.request)
            else:
                failed.append((held.request, str(error)))
        return ready, failed

    def abort(self, request_ids: list[str]) -> list[Request]:
        """Drop held requests among `request_ids` (returned) and release every id's pin."""
        dropped = [self._held.pop(r).request for r in request_ids if r in self._held]
        for req_id in [*request_ids, *(f.request_id for d in dropped for f in d.followers)]:
            self.release(req_id)
        return dropped

    def _is_pinned(self, digest: str) -> bool:
        with self._pin_lock:
            return digest in self._pin_counts

    def _pin(self, request: Request, digest: str) -> None:
        req_id = request.request_id
        if req_id in self._pinned:
            return
        self._pinned[req_id] = digest
        self._live[req_id] = request
        with self._pin_lock:
            self._pin_counts[digest] = self._pin_counts.get(digest, 0) + 1

    def release(self, req_id: str) -> None:
        """The request finished: its grammar may be evicted once no live request uses it."""
        digest = self._pinned.pop(req_id, None)
        if digest is None:
            return
        del self._live[req_id]
        self._matchers.pop(req_id, None)
        with self._pin_lock:
            left = self._pin_counts.pop(digest) - 1
            if left:
                self._pin_counts[digest] = left
        if not left and self._cache is not None:
            self._cache.evict()

    def fill_bitmask(self, plan: SchedulerOutput) -> GrammarOutput | None:
        """The masks of the structured requests that sample in `plan` (None when there is none:
        no work at all while no structured request is live).

        Which requests sample: schedule() counted the token a step samples as pending. A step
        that samples a structured request is never async (such a request is not plain greedy:
        worker/input_batch.py), so it is updated before the next schedule and such a request
        holds no pending token before schedule(): after it, num_pending is 1 exactly when this
        step samples it. Its matcher has then accepted every token it has.
        """
        if not self._live:
            return None
        scheduled = plan.num_scheduled_tokens
        req_ids: list[str] = []
        matchers: list[Any] = []
        for req_id, request in self._live.items():
            if not request.num_pending or req_id not in scheduled:
                continue  # not scheduled, or a prompt chunk that samples nothing
            assert request.num_pending == 1, (req_id, request.num_pending)  # see above
            matcher = self._matchers.get(req_id)
            if matcher is None:
                spec = request.sampling_params.structured_outputs
                assert spec is not None  # only structured requests are live here
                matcher = self._matchers[req_id] = self.cache().matcher(spec, request.output_token_ids)
            if matcher.is_terminated():  # its end accepted (e.g. under ignore_eos): masks nothing
                continue
            req_ids.append(req_id)
            matchers.append(matcher)
        if not req_ids:
            return None
        bitmask = self.cache().allocate_bitmask(len(req_ids))  # [G, ceil(vocab / 32)] int32, CPU
        for row, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        return GrammarOutput(req_ids, bitmask.numpy().tobytes(), bitmask.shape[1])

    def accept(self, sampled_token_ids: dict[str, int]) -> None:
        """Advance each matcher by the token its request sampled in a step (req_id -> token)."""
        for req_id, matcher in self._matchers.items():
            token = sampled_token_ids.get(req_id)
            if token is not None and not matcher.is_terminated():
                matcher.accept_token(token)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
