"""Canary rollback and shadow comparison.

CanaryGuard keeps the canary's outcomes over a sliding window of `window_s` seconds. Once the window
holds `min_requests` outcomes and the error rate passes `max_error_rate` (or the P99 latency passes
`max_p99_s`), the canary weight goes to 0: logged, counted, and kept at 0 until the config's canary
section changes.

Shadow: the mirrored request runs non-streamed on a shadow backend after the primary answered; its
outputs are compared per choice with the primary's. Only greedy requests (temperature 0) can be
expected to agree exactly; others are counted as `not_greedy` and only their latency is compared.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

from pagedserve.router.config import CanaryConfig
from pagedserve.router.metrics import RouterMetrics
from pagedserve.router.pool import Pool

logger = logging.getLogger(__name__)


class CanaryGuard:
    def __init__(self) -> None:
        self._window: deque[tuple[float, bool, float]] = deque()  # (time, ok, latency_s)

    def reset(self) -> None:
        self._window.clear()

    def record(self, pool: Pool, metrics: RouterMetrics, ok: bool, latency_s: float,
               now: float | None = None) -> bool:  # fmt: skip
        """Adds one canary outcome; returns True when it triggered a rollback."""
        cfg = pool.config.canary
        if cfg is None or pool.canary_weight <= 0:
            return False
        now = time.monotonic() if now is None else now
        self._window.append((now, ok, latency_s))
        while self._window and self._window[0][0] < now - cfg.window_s:
            self._window.popleft()
        reason = self._verdict(cfg)
        if reason is None:
            return False
        logger.warning("canary rolled back (weight %.3f -> 0): %s", pool.canary_weight, reason)
        pool.canary_weight = 0.0
        metrics.canary_rollbacks.inc()
        metrics.canary_weight.set(0.0)
        self._window.clear()
        return True

    def _verdict(self, cfg: CanaryConfig) -> str | None:
        n = len(self._window)
        if n < cfg.min_requests:
            return None
        errors = sum(1 for _, ok, _ in self._window if not ok)
        if errors / n > cfg.max_error_rate:
            return f"error rate {errors}/{n} over the last {cfg.window_s:g} s > {cfg.max_error_rate:g}"
        if cfg.max_p99_s is not None:
            latencies = sorted(lat for _, _, lat in self._window)
            p99 = latencies[min(n - 1, math.ceil(0.99 * n) - 1)]
            if p99 > cfg.max_p99_s:
                return f"P99 latency {p99:.3f} s over the last {cfg.window_s:g} s > {cfg.max_p99_s:g} s"
        return None


def is_greedy(body: dict[str, Any]) -> bool:
    return body.get("temperature") == 0 or body.get("top_k") == 1


def response_texts(route: str, response: dict[str, Any]) -> dict[int, str]:
    """choice index -> generated text of a non-streamed response."""
    out: dict[int, str] = {}
    for choice in response.get("choices") or []:
        if route == "chat":
            message = choice.get("message") or {}
            out[int(choice.get("index", 0))] = str(message.get("content") or "") + str(
                message.get("tool_calls") or ""
            )
        else:
            out[int(choice.get("index", 0))] = str(choice.get("text") or "")
    return out


def compare_shadow(
    metrics: RouterMetrics, body: dict[str, Any], primary: dict[int, str], shadow: dict[int, str] | None,
    primary_latency_s: float, shadow_latency_s: float,
) -> str:  # fmt: skip
    if shadow is None:
        result = "error"
    else:
        metrics.shadow_delta.observe(shadow_latency_s - primary_latency_s)
        if not is_greedy(body):
            result = "not_greedy"
        else:
            result = "match" if shadow == primary else "mismatch"
    metrics.record_shadow(result)
    return result
