"""Backends, their health and circuit breakers.

A backend takes traffic only while it is *eligible*: its last active probe of /health answered 200
(a server that is loading or draining answers 503, so it gets nothing) AND its circuit breaker lets
requests through. Passive signals (connect errors, timeouts, 5xx, broken streams) feed the breaker;
a refused connection also marks the backend down at once, without waiting for the next probe.

Breaker states:

    closed --(failure_threshold consecutive failures)--> open --(open_s elapsed)--> half_open
    half_open --(trial or probe succeeds)--> closed       half_open --(trial fails)--> open

In half_open one request at a time is let through as the trial.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pagedserve.router.config import BackendConfig, BreakerConfig


class CircuitState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(slots=True)
class CircuitBreaker:
    config: BreakerConfig
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0  # consecutive
    opened_at: float = 0.0
    trial_in_flight: bool = False

    def _refresh(self, now: float) -> None:
        if self.state is CircuitState.OPEN and now - self.opened_at >= self.config.open_s:
            self.state = CircuitState.HALF_OPEN
            self.trial_in_flight = False

    def allows(self, now: float | None = None) -> bool:
        self._refresh(time.monotonic() if now is None else now)
        if self.state is CircuitState.CLOSED:
            return True
        return self.state is CircuitState.HALF_OPEN and not self.trial_in_flight

    def on_dispatch(self) -> None:
        if self.state is CircuitState.HALF_OPEN:
            self.trial_in_flight = True

    def record_success(self) -> None:
        self.state, self.failures, self.trial_in_flight = CircuitState.CLOSED, 0, False

    def record_failure(self, now: float | None = None) -> bool:
        """Returns True when this failure opened the circuit."""
        now = time.monotonic() if now is None else now
        self._refresh(now)
        self.failures += 1
        self.trial_in_flight = False
        if self.state is CircuitState.HALF_OPEN or (
            self.state is CircuitState.CLOSED and self.failures >= self.config.failure_threshold
        ):
            self.state, self.opened_at = CircuitState.OPEN, now
            return True
        return False


@dataclass(eq=False)
class Backend:
    """One server. Identity is the object: a reload keeps the object for a url it keeps, so the
    outstanding count and breaker survive, and in-flight requests hold on to removed ones."""

    url: str
    region: str
    group: str  # "primary", "canary" or "shadow"
    weight: float
    api_key: str | None
    breaker: CircuitBreaker
    probe_ok: bool = False  # no traffic before the first successful probe (a loading server)
    last_probe_status: str = "unknown"
    outstanding: int = 0
    served: int = 0
    removed: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: BackendConfig, region: str, group: str, breaker: BreakerConfig) -> Backend:
        return cls(cfg.url, region, group, cfg.weight, cfg.api_key, CircuitBreaker(breaker))

    def update(self, cfg: BackendConfig, region: str, group: str, breaker: BreakerConfig) -> None:
        self.region, self.group, self.weight, self.api_key = region, group, cfg.weight, cfg.api_key
        self.breaker.config = breaker
        self.removed = False

    def eligible(self, now: float | None = None) -> bool:
        return self.probe_ok and not self.removed and self.breaker.allows(now)

    def load(self) -> float:
        """Least-outstanding, weighted: a weight-2 backend takes twice the requests."""
        return (self.outstanding + 1) / self.weight

    # Passive health -------------------------------------------------------------------------

    def on_success(self) -> None:
        self.breaker.record_success()

    def on_failure(self, definitive: bool = False) -> bool:
        """A failed request. `definitive` (connection refused): the server is gone, stop routing
        to it until a probe says otherwise. Returns True when the circuit opened."""
        if definitive:
            self.probe_ok = False
            self.last_probe_status = "connect-refused"
        return self.breaker.record_failure()

    # Active health --------------------------------------------------------------------------

    def on_probe(self, ok: bool, status: str) -> None:
        self.probe_ok, self.last_probe_status = ok, status
        if ok and self.breaker.state is CircuitState.HALF_OPEN:
            self.breaker.record_success()
