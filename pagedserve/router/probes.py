"""Active health probes: GET <backend>/health every `probe_interval_s` seconds, all backends in
parallel. 200 -> traffic; 503 (starting, draining, engine gone) or no answer -> no traffic.
The loop re-reads the pool each round, so a reload's new backends are probed from the next round."""

from __future__ import annotations

import asyncio
import logging

import httpx

from pagedserve.router.backends import Backend
from pagedserve.router.pool import Pool

logger = logging.getLogger(__name__)


async def probe_one(client: httpx.AsyncClient, b: Backend, timeout_s: float) -> None:
    try:
        resp = await client.get(b.url + "/health", timeout=timeout_s)
        ok, status = resp.status_code == 200, str(resp.status_code)
        if not ok:
            try:
                status = f"{resp.status_code} {resp.json().get('status', '')}".strip()
            except ValueError:
                pass
    except httpx.HTTPError as e:
        ok, status = False, type(e).__name__
    if ok != b.probe_ok:
        logger.info("backend %s (%s) is %s (%s)", b.url, b.region, "up" if ok else "down", status)
    b.on_probe(ok, status)


async def probe_all(client: httpx.AsyncClient, pool: Pool) -> None:
    timeout = pool.config.probe_timeout_s
    await asyncio.gather(*(probe_one(client, b, timeout) for b in list(pool.backends.values())))


async def probe_loop(client: httpx.AsyncClient, pool: Pool) -> None:
    while True:
        await probe_all(client, pool)
        await asyncio.sleep(pool.config.probe_interval_s)
