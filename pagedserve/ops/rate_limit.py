"""Per-tenant limits: requests and tokens per minute over a sliding window, concurrent requests.

    admit(ctx, prompt_tokens, max_completion_tokens) -> Lease     or raises LimitExceeded
    lease.completion_tokens += n      the route counts what is generated as it streams
    lease.release()                   the request is over (however it ended): the reservation is
                                      settled at prompt + completion_tokens (the rest refunded) and
                                      the concurrency slot freed; idempotent

Race-freedom: every method runs on the server's event loop and none awaits, so the check of
every limit and the reservation that follows are one atomic step; N concurrent requests can
never all pass a check that only N-1 of them fit. Tokens are reserved at admission as
prompt + max completion (the most the request can use) and refunded when it finishes, so
requests in flight can never together exceed tokens_per_minute either.

Window: a request or token reservation counts for WINDOW_S seconds from its admission (a
sliding log, not a fixed minute), so no burst at a minute boundary doubles the rate.
Retry-After is the time until the oldest entries leave the window far enough for this request.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedserve.ops.tenants import TenantContext

WINDOW_S = 60.0


class LimitExceeded(Exception):
    """`limit` names the policy field; retry_after_s is when the request could pass."""

    def __init__(self, limit: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class _TokenEntry:
    time: float
    tokens: int
    counted: bool = True  # still in _TenantState.tokens (and so in tokens_in_window)


@dataclass(slots=True)
class _TenantState:
    requests: deque[float] = field(default_factory=deque)  # admission times in the window
    tokens: deque[_TokenEntry] = field(default_factory=deque)
    tokens_in_window: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0].time <= now - WINDOW_S:
            entry = self.tokens.popleft()
            entry.counted = False
            self.tokens_in_window -= entry.tokens


class Lease:
    """One admitted request's hold on its tenant's limits."""

    def __init__(self, limiter: TenantLimiter, state: _TenantState, entry: _TokenEntry | None,
                 prompt_tokens: int, reserved: int) -> None:  # fmt: skip
        self._limiter = limiter
        self._state = state
        self._entry = entry
        self.prompt_tokens = prompt_tokens
        self.reserved = reserved  # prompt + max completion tokens
        self.completion_tokens = 0  # generated so far (the route counts them)
        self.used: int | None = None  # prompt + completion tokens, once released
        self.released = False
        self.meta: Any = None  # what the owner needs at release (the server: model and tenant label)

    def _settle(self) -> None:
        """The token reservation shrinks to what was used (the engine stopped generating)."""
        self.used = min(self.reserved, self.prompt_tokens + max(0, self.completion_tokens))
        entry = self._entry
        if entry is not None and self.used < entry.tokens:
            if entry.counted:  # invariant: tokens_in_window == sum of the counted entries' tokens
                self._state.tokens_in_window -= entry.tokens - self.used
            entry.tokens = self.used

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._settle()
        self._state.in_flight -= 1
        self._limiter.on_release(self)


class TenantLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 on_release: Callable[[Lease], None] | None = None) -> None:  # fmt: skip
        self.clock = clock
        self._states: dict[str, _TenantState] = {}
        self._on_release = on_release

    def on_release(self, lease: Lease) -> None:
        if self._on_release is not None:
            self._on_release(lease)

    def state(self, key: str) -> _TenantState:
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _TenantState()
        return st

    def in_flight(self, ctx: TenantContext) -> int:
        return self.state(ctx.limiter_key).in_flight

    def peak(self, ctx: TenantContext) -> int:
        return self.state(ctx.limiter_key).peak_in_flight

    def precheck(self, ctx: TenantContext) -> None:
        """The request-count limits alone, reserving nothing: a cheap early refusal before the
        prompt is tokenized (admit() checks again, atomically, and reserves)."""
        self._check(ctx, self.state(ctx.limiter_key), self.clock(), None)

    def admit(self, ctx: TenantContext, prompt_tokens: int, max_completion_tokens: int) -> Lease:
        st = self.state(ctx.limiter_key)
        now = self.clock()
        reserved = prompt_tokens + max_completion_tokens
        self._check(ctx, st, now, reserved)
        # every limit passed: reserve (no await between the checks and here)
        policy = ctx.policy
        if policy.requests_per_minute is not None:
            st.requests.append(now)
        entry = None
        if policy.tokens_per_minute is not None:
            entry = _TokenEntry(now, reserved)
            st.tokens.append(entry)
            st.tokens_in_window += reserved
        st.in_flight += 1
        st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        return Lease(self, st, entry, prompt_tokens, reserved)

    @staticmethod
    def _check(ctx: TenantContext, st: _TenantState, now: float, reserved: int | None) -> None:
        policy = ctx.policy
        st.expire(now)
        who = f"tenant {ctx.name!r}" if ctx.name is not None else "anonymous requests"
        cap = policy.max_concurrent
        if cap is not None and st.in_flight >= cap:
            raise LimitExceeded("max_concurrent", f"Rate limit reached for {who}: max_concurrent {cap} "
                                f"requests in flight; retry when one finishes.", 1.0)  # fmt: skip
        rpm = policy.requests_per_minute
        if rpm is not None and len(st.requests) >= rpm:
            wait = st.requests[len(st.requests) - rpm] + WINDOW_S - now
            raise LimitExceeded("requests_per_minute", f"Rate limit reached for {who}: requests_per_minute "
                                f"{rpm}; retry in {math.ceil(wait)} s.", wait)  # fmt: skip
        tpm = policy.tokens_per_minute
        if tpm is None or reserved is None:
            return
        if reserved > tpm:
            raise LimitExceeded("tokens_per_minute", f"Request too large for {who}: it may use {reserved} "
                                f"tokens (prompt + max_tokens), tokens_per_minute is {tpm}; reduce the prompt "
                                "or max_tokens.", WINDOW_S)  # fmt: skip
        if st.tokens_in_window + reserved > tpm:
            excess = st.tokens_in_window + reserved - tpm
            wait = WINDOW_S
            for e in st.tokens:  # the oldest entries leave first
                excess -= e.tokens
                if excess <= 0:
                    wait = e.time + WINDOW_S - now
                    break
            raise LimitExceeded("tokens_per_minute", f"Rate limit reached for {who}: tokens_per_minute {tpm} "
                                f"(in use {st.tokens_in_window}, requested {reserved} = prompt + max_tokens); "
                                f"retry in {math.ceil(wait)} s.", wait)  # fmt: skip
