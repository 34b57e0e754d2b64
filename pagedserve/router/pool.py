"""Which backend serves a request.

1. Group: canary gets a `weight` share (a deterministic credit counter, not a coin flip, so the
   share is exact over any run of requests), else the primary regions.
2. Region: the highest-priority (lowest number) region with an eligible backend, among the regions
   the tenant is pinned to; backends already tried by this request are skipped, so a retry moves on
   to the next backend and then the next region.
3. Backend: with an affinity key (session header or prompt prefix), consistent hashing with
   bounded load: walk the ring clockwise from the key's point and take the first backend whose
   outstanding count stays within load_factor x the region's mean (+1). Without a key, the fewest
   outstanding requests per unit of weight; ties rotate.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import xxhash

from pagedserve.router.backends import Backend
from pagedserve.router.config import BackendConfig, RouterConfig

VNODES = 64  # ring points per backend: enough for an even split of keys over a few backends


def _hash(text: str) -> int:
    return int(xxhash.xxh64_intdigest(text.encode()))


class HashRing:
    def __init__(self, backends: Iterable[Backend]) -> None:
        points = sorted((_hash(f"{b.url}#{i}"), b.url) for b in backends for i in range(VNODES))
        self._keys = [p for p, _ in points]
        self._urls = [u for _, u in points]

    def walk(self, key: str) -> list[str]:
        """Distinct backend urls in ring order starting at the key's point."""
        if not self._keys:
            return []
        start = bisect.bisect(self._keys, _hash(key)) % len(self._keys)
        seen: dict[str, None] = {}
        for i in range(len(self._keys)):
            seen.setdefault(self._urls[(start + i) % len(self._keys)], None)
        return list(seen)


@dataclass(slots=True)
class Choice:
    backend: Backend
    affinity: str | None = None  # "hit" (the key's own backend) or "spill" (bounded load moved it)


class Pool:
    def __init__(self, config: RouterConfig) -> None:
        self.backends: dict[str, Backend] = {}
        self.config = config
        self.canary_weight = 0.0
        self._canary_credit = 0.0
        self._shadow_credit = 0.0
        self._rotation = 0
        self._rings: dict[tuple[str, ...], HashRing] = {}
        self._applied = False
        self.apply(config)

    # Config ---------------------------------------------------------------------------------

    def apply(self, config: RouterConfig) -> tuple[list[str], list[str]]:
        """Installs a (re)loaded config; returns (added urls, removed urls). Kept backends keep
        their state; removed ones are flagged so in-flight requests finish but no new ones start."""
        wanted: dict[str, tuple[BackendConfig, str, str]] = {}
        for region in config.regions:
            for b in region.backends:
                wanted[b.url] = (b, region.name, "primary")
        if config.canary is not None:
            wanted.update({b.url: (b, "canary", "canary") for b in config.canary.backends})
        if config.shadow is not None:
            wanted.update({b.url: (b, "shadow", "shadow") for b in config.shadow.backends})
        added = [u for u in wanted if u not in self.backends]
        removed = [u for u in self.backends if u not in wanted]
        for url in removed:
            self.backends.pop(url).removed = True
        for url, (cfg, region_name, group) in wanted.items():
            if url in self.backends:
                self.backends[url].update(cfg, region_name, group, config.breaker)
            else:
                self.backends[url] = Backend.from_config(cfg, region_name, group, config.breaker)
        first, self._applied = not self._applied, True
        if config.canary is None:
            self.canary_weight = 0.0
        elif first or self.config.canary != config.canary:
            # a changed canary section re-arms a rolled-back canary; an unchanged one stays rolled back
            self.canary_weight = config.canary.weight
        self.config = config
        self._rings.clear()
        return added, removed

    def group(self, name: str) -> list[Backend]:
        return [b for b in self.backends.values() if b.group == name]

    def regions(self) -> list[tuple[str, list[Backend]]]:
        """Primary regions, highest priority first."""
        ordered = sorted(self.config.regions, key=lambda r: r.priority)
        return [(r.name, [self.backends[b.url] for b in r.backends]) for r in ordered]

    # Choice ---------------------------------------------------------------------------------

    def take_canary_turn(self) -> bool:
        """True for a `canary_weight` share of calls (credit accumulates by the weight)."""
        if self.canary_weight <= 0 or not any(b.eligible() for b in self.group("canary")):
            return False
        self._canary_credit += self.canary_weight
        if self._canary_credit >= 1.0 - 1e-9:
            self._canary_credit -= 1.0
            return True
        return False

    def take_shadow_turn(self) -> bool:
        shadow = self.config.shadow
        if shadow is None or shadow.fraction <= 0:
            return False
        self._shadow_credit += shadow.fraction
        if self._shadow_credit >= 1.0 - 1e-9:
            self._shadow_credit -= 1.0
            return True
        return False

    def choose(
        self, tried: set[Backend], tenant: str | None = None, key: str | None = None, canary: bool = False
    ) -> Choice | None:
        allowed = self.config.tenants.get(tenant or "") if tenant else None
        if canary and allowed is None:  # a tenant pinned to regions never lands on the canary
            found = self._pick([b for b in self.group("canary") if b not in tried and b.eligible()], key)
            if found is not None:
                return found
        for name, members in self.regions():
            if allowed is not None and name not in allowed:
                continue
            ready = [b for b in members if b not in tried and b.eligible()]
            if ready:
                return self._pick(ready, key)
        return None

    def _pick(self, ready: list[Backend], key: str | None) -> Choice | None:
        if not ready:
            return None
        if key is not None and len(ready) > 1:
            return self._by_ring(ready, key)
        self._rotation += 1
        n = len(ready)
        best = min(range(n), key=lambda i: (ready[i].load(), (i - self._rotation) % n))
        return Choice(ready[best])

    def _by_ring(self, ready: list[Backend], key: str) -> Choice:
        # A ring over the ready backends: when one goes down only its own keys move elsewhere.
        members = tuple(sorted(b.url for b in ready))
        ring = self._rings.get(members)
        if ring is None:
            ring = self._rings[members] = HashRing(ready)
        by_url = {b.url: b for b in ready}
        total = sum(b.outstanding for b in ready)
        cap = math.ceil(self.config.affinity.load_factor * (total + 1) / len(ready))
        order = ring.walk(key)
        for i, url in enumerate(order):
            if by_url[url].outstanding + 1 <= cap:
                return Choice(by_url[url], "hit" if i == 0 else "spill")
        return Choice(by_url[order[0]], "hit")


def prefix_key(body: dict[str, Any], chars: int) -> str | None:
    """A key from the start of the prompt: requests sharing it share KV prefix blocks."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt[:chars]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return ",".join(map(str, prompt[:chars]))
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                parts.append(f"{m.get('role')}:{content if isinstance(content, str) else json.dumps(content)}")
        return "\n".join(parts)[:chars] or None
    return None
