"""Failover under load: two regions of real pagedserve servers behind `pagedserve router`.

Steady mixed load (streamed and non-streamed greedy /v1/completions and /v1/chat/completions, a
fixed number of concurrent clients) runs through five phases of `--phase-s` seconds each:

    before        everything up
    kill-one      one backend of region 0 SIGKILLed (its process group: server + engine)
    kill-region   the rest of region 0 SIGKILLed: traffic must move to region 1
    restarted     region 0's servers started again (they get traffic once /health says 200)
    after         steady state again

and prints: requests sent, failed (non-200 answers, broken or error-carrying streams), resumed
streams (the router's counter), the time from region 0's death to the first success served by
region 1 (the router's x-pagedserve-region header), and P99 latency per phase.

With `--affinity-compare` it also runs a shared-prefix workload twice, prefix affinity on and off,
and prints each run's prefix-cache hit rate (the backends' vllm:prefix_cache_hits / queries).

    python -m benchmarks.failover [--model DIR] [--backends-per-region 2] [--clients 8] [--phase-s 20]
        [--device cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.common import print_table, write_json

PHASES = ("before", "kill-one", "kill-region", "restarted", "after")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    port: int
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            # A session of its own, so that SIGKILL of the group takes the engine process too.
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_healthy(url: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not healthy after {timeout_s} s")


@dataclass
class Record:
    phase: str
    ok: bool
    latency_s: float
    done_at: float
    region: str | None
    stream: bool


@dataclass
class Load:
    url: str
    model: str
    max_tokens: int
    phase: str = "before"
    records: list[Record] = field(default_factory=list)
    stop: bool = False

    async def client(self, i: int) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            n = 0
            while not self.stop:
                n += 1
                await self.one(client, i, n)

    async def one(self, client: httpx.AsyncClient, i: int, n: int) -> None:
        stream, chat = n % 2 == 0, (n // 2) % 2 == 0
        common = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.0, "ignore_eos": True}
        if chat:
            path, body = "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": f"c{i} n{n}"}]}
        else:
            path, body = "/v1/completions", {**common, "prompt": f"client {i} request {n}"}
        phase, t0, ok, region = self.phase, time.perf_counter(), False, None
        try:
            if stream:
                async with client.stream("POST", self.url + path, json={**body, "stream": True}) as r:
                    region = r.headers.get("x-pagedserve-region")
                    events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                ok = r.status_code == 200 and events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
            else:
                r = await client.post(self.url + path, json=body)
                region, ok = r.headers.get("x-pagedserve-region"), r.status_code == 200
        except httpx.HTTPError:
            ok = False
        self.records.append(Record(phase, ok, time.perf_counter() - t0, time.perf_counter(), region, stream))


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def _router_counter(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _prefix_hits(servers: list[Server]) -> tuple[float, float]:
    hits = queries = 0.0
    for s in servers:
        for line in httpx.get(s.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def start_router(config: dict[str, Any], tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    path = tmp / f"router-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    with (tmp / f"router-{port}.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pagedserve.entrypoints.cli", "router", "--config", str(path),
                                 "--port", str(port), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 60)
    return proc, url


async def failover(args: argparse.Namespace, regions: list[list[Server]], tmp: Path) -> dict[str, Any]:
    config = {"probe_interval_s": args.probe_interval_s, "retry_deadline_s": 30.0,
              "regions": [{"name": f"region{r}", "priority": r, "backends": [{"url": s.url} for s in servers]}
                          for r, servers in enumerate(regions)]}  # fmt: skip
    router, url = start_router(config, tmp)
    load = Load(url, "bench", args.max_tokens)
    tasks = [asyncio.create_task(load.client(i)) for i in range(args.clients)]
    region_death = 0.0
    try:
        for phase in PHASES:
            load.phase = phase
            if phase == "kill-one":
                regions[0][0].kill()
            elif phase == "kill-region":
                for s in regions[0]:
                    s.kill()
                region_death = time.perf_counter()
            elif phase == "restarted":
                for s in regions[0]:
                    s.start()
            await asyncio.sleep(args.phase_s)
        load.stop = True
        await asyncio.gather(*tasks)
        resumed = _router_counter(url, "pagedserve_router_resumed_streams_total")
        retries = _router_counter(url, "pagedserve_router_retries_total")
    finally:
        load.stop = True
        router.send_signal(signal.SIGINT)
        router.wait(20)
    recs = load.records
    first_other = min((r.done_at for r in recs if r.ok and r.region == "region1" and r.done_at >= region_death),
                      default=None)  # fmt: skip
    rows = [{"phase": p, "requests": sum(r.phase == p for r in recs),
             "failed": sum(r.phase == p and not r.ok for r in recs),
             "p99_latency_s": _p99([r.latency_s for r in recs if r.phase == p and r.ok])} for p in PHASES]  # fmt: skip
    print_table("failover: latency by phase", rows)
    summary = {"requests": len(recs), "failed": sum(not r.ok for r in recs), "resumed_streams": resumed,
               "retries": retries,
               "region_death_to_first_success_s": None if first_other is None else first_other - region_death}  # fmt: skip
    print_table("failover: summary", [summary])
    return {"phases": rows, "summary": summary}


async def affinity_compare(args: argparse.Namespace, servers: list[Server], tmp: Path) -> list[dict[str, Any]]:
    rows = []
    system = "You are a careful assistant who answers in one short sentence. " * 3
    for affinity in (False, True):
        config = {"probe_interval_s": args.probe_interval_s, "affinity": {"prefix": affinity, "prefix_chars": 128},
                  "regions": [{"name": "r", "backends": [{"url": s.url} for s in servers]}]}  # fmt: skip
        router, url = start_router(config, tmp)
        before = _prefix_hits(servers)
        try:
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(j: int, tag: str = "affinity" if affinity else "plain", url: str = url) -> None:
                    # 8 "system prompts"; the run's tag first so the second run finds nothing cached
                    body = {"model": "bench", "max_tokens": 4, "temperature": 0.0,
                            "prompt": f"[{tag} group {j % 8}] {system} question {j}"}
                    await client.post(url + "/v1/completions", json=body)

                for start in range(0, args.affinity_requests, args.clients):
                    await asyncio.gather(*(one(j) for j in range(start, min(start + args.clients, args.affinity_requests))))
        finally:
            router.send_signal(signal.SIGINT)
            router.wait(20)
        after = _prefix_hits(servers)
        hits, queries = after[0] - before[0], after[1] - before[1]
        rows.append({"prefix_affinity": affinity, "requests": args.affinity_requests,
                     "prefix_cache_hit_rate": hits / queries if queries else None})
    print_table("prefix-cache hit rate: affinity vs least-outstanding", rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: build the tiny llama test checkpoint)")
    p.add_argument("--backends-per-region", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--phase-s", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--probe-interval-s", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--server-args", default="--dtype float32 --max-model-len 256 --kv-cache-memory-bytes 8388608 "
                   "--swap-space 0.01",
                   help="extra flags for every server")
    p.add_argument("--affinity-compare", action="store_true")
    p.add_argument("--affinity-requests", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="failover-"))
    model = args.model
    if model is None:
        from pagedserve.testing.checkpoints import build_checkpoint

        model = build_checkpoint(str(tmp / "llama"), "llama")
    regions: list[list[Server]] = []
    for _ in range(2):
        servers = []
        for _ in range(args.backends_per_region):
            port = _free_port()
            cmd = [sys.executable, "-m", "pagedserve.entrypoints.openai.api_server", "--model", model,
                   "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench",
                   "--device", args.device, *args.server_args.split()]  # fmt: skip
            servers.append(Server(port, cmd, tmp / f"server-{port}.log"))
        regions.append(servers)
    everything = [s for servers in regions for s in servers]
    try:
        for s in everything:
            s.start()
        for s in everything:
            wait_healthy(s.url)
        result: dict[str, Any] = {"args": vars(args)}
        if args.affinity_compare:
            result["affinity"] = asyncio.run(affinity_compare(args, everything, tmp))
        result["failover"] = asyncio.run(failover(args, regions, tmp))
        write_json(args.json, result)
        print(json.dumps(result["failover"]["summary"]))
    finally:
        for s in everything:
            s.stop()


if __name__ == "__main__":
    main()
