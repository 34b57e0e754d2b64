"""The OpenAI server under Poisson arrivals: TTFT, TPOT and inter-token latency (P50/P99), the
achieved throughput, goodput and SLO attainment, at several request rates, on the ShareGPT-like
mix (ignore_eos, streamed).

Starts `python -m pagedserve.entrypoints.openai.api_server` itself, waits for /health, then for
each rate sends `--num-requests` streamed /v1/completions requests (token-id prompts) whose
inter-arrival gaps are exponential with mean 1/rate (seeded).

Goodput is the requests per second that met both objectives (`--slo-ttft-ms`, `--slo-tpot-ms`;
TTFT and TPOT as measured by the client); SLO attainment the share of the requests sent that met
them: a request refused with 429 (load shedding) counts as sent and missed. TTFT/TPOT percentiles
are over the admitted requests.

    python -m benchmarks.serving --model DIR [--rates 4 8 16 32] [--num-requests 500] [--json OUT]
        [--slo-ttft-ms 1000 --slo-tpot-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np

from benchmarks.common import print_table, write_json
from benchmarks.workload import sharegpt_like


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
               start_at: float, record: list[dict]) -> None:
    """One streamed request sent at time.monotonic() == start_at; its record's times are
    time.monotonic() (one clock for every client process: CLOCK_MONOTONIC is system-wide)."""
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 1.0}
    sent = time.monotonic()
    arrivals: list[float] = []
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                record.append({"ok": False, "status": response.status_code, "done": time.monotonic()})
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    arrivals.append(time.monotonic())
    except httpx.TransportError as exc:  # one broken connection is one failed request, not a crash
        record.append({"ok": False, "status": f"transport: {type(exc).__name__}", "done": time.monotonic()})
        return
    done = time.monotonic()
    record.append({"ok": True, "sent": sent, "arrivals": arrivals, "done": done, "tokens": max_tokens})


async def _stream_all(base: str, model: str, items: list[tuple[list[int], int, float]], t0: float) -> list[dict]:
    """items: (prompt, max_tokens, start offset in seconds from t0); the requests' records."""
    record: list[dict] = []
    # No keep-alive pool: at low Poisson rates a pooled connection can sit idle past the server's
    # keep-alive timeout (uvicorn: 5 s) and be closed just as a request is sent on it (an
    # httpx.ReadError that ended the H200 run of 2026-12-01); a fresh connection per request
    # costs a loopback handshake, far below the latencies measured.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        await asyncio.gather(*(_one(client, base + "/v1/completions", model, p, n, t0 + s, record)
                               for p, n, s in items))
    return record


def _client_process(base: str, model: str, items: list[tuple[list[int], int, float]], ready: Any, go: Any,
                    start: Any, results: Any) -> None:
    """One client process: imports done and loop ready, it waits for the common start time."""
    ready.put(1)
    go.wait()
    results.put(asyncio.run(_stream_all(base, model, items, start.value)))


def default_client_procs() -> int:
    """Client processes by default: one per 4 cores, at most 8 (the server needs cores too)."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def measure_rate(base: str, model: str, prompts, out_lens, rate: float, seed: int,
                 slo_ttft_ms: float = 1000.0, slo_tpot_ms: float = 50.0, client_procs: int = 1) -> dict:
    """Send the requests with Poisson arrivals (seeded) and summarise what the client saw.

    client_procs > 1 spreads the requests (round-robin over the same arrival schedule) over that
    many processes. One Python client is not fast enough past a few thousand streamed tokens a
    second: against benchmarks/stream_stub.py sending exactly 30 ms TPOT and 20 ms TTFT at 81
    req/s, one process measured TTFT P50 898 ms and TPOT P99 37.5 ms on the 2-core CPU machine (busy with a CI run)
    (benchmarks/client_check.py), so a slow client reads as a slow server.
    """
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, len(prompts))
    starts = np.cumsum(gaps) - gaps[0]
    items = [(p, int(n), float(s)) for p, n, s in zip(prompts, out_lens, starts)]
    if client_procs <= 1:
        t0 = time.monotonic()
        record = asyncio.run(_stream_all(base, model, items, t0))
    else:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no threads or loops of the parent
        ready, results, go, start = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
        shards = [items[k::client_procs] for k in range(client_procs)]
        procs = [ctx.Process(target=_client_process, args=(base, model, shard, ready, go, start, results), daemon=True)
                 for shard in shards]  # fmt: skip
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.get(timeout=120)
        t0 = start.value = time.monotonic() + 0.2
        go.set()
        record = [r for _ in procs for r in results.get()]
        for proc in procs:
            proc.join(timeout=30)
    elapsed = max((r["done"] for r in record), default=t0) - t0
    return summarize(record, len(prompts), elapsed, rate, slo_ttft_ms, slo_tpot_ms, client_procs)


def summarize(record: list[dict], num_sent: int, elapsed: float, rate: float, slo_ttft_ms: float,
              slo_tpot_ms: float, client_procs: int) -> dict:
    ok = [r for r in record if r["ok"]]
    ttft = [r["arrivals"][0] - r["sent"] for r in ok if r["arrivals"]]
    tpot = [(r["done"] - r["arrivals"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1 and r["arrivals"]]
    ttft_met = [bool(r["arrivals"]) and (r["arrivals"][0] - r["sent"]) * 1e3 <= slo_ttft_ms for r in ok]
    tpot_met = [r["tokens"] <= 1 or (bool(r["arrivals"]) and (r["done"] - r["arrivals"][0]) / (r["tokens"] - 1)
                                     * 1e3 <= slo_tpot_ms) for r in ok]  # fmt: skip
    met = sum(a and b for a, b in zip(ttft_met, tpot_met))
    itl = [b - a for r in ok for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["tokens"] for r in ok)
    elapsed = max(elapsed, 1e-9)

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q) * 1e3) if values else float("nan")

    return {
        "rate_rps": rate, "requests": num_sent, "client_procs": client_procs,
        "failed": sum(1 for r in record if not r["ok"] and r["status"] != 429),
        "shed_429": sum(1 for r in record if not r["ok"] and r["status"] == 429),
        "elapsed_s": elapsed, "achieved_rps": len(ok) / elapsed, "output_tokens_per_s": tokens / elapsed,
        "goodput_rps": met / elapsed, "slo_attainment": met / num_sent,
        "ttft_attainment": sum(ttft_met) / num_sent, "tpot_attainment": sum(tpot_met) / num_sent,
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
        "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
    }


def _server_env(tree: str | None, extra_env: dict[str, str] | None = None) -> dict[str, str] | None:
    if tree is None and not extra_env:
        return None
    env = {**os.environ, **(extra_env or {})}
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(tree), *filter(None, [env.get("PYTHONPATH")])])
    return env


@contextlib.contextmanager
def running_server(model: str, server_args: list[str], log_path: str | None = None,
                   served_name: str = "bench", tree: str | None = None,
                   extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, float]]:  # fmt: skip
    """(base URL, seconds to ready) of a server started for the benchmark; stopped on exit.
    Its log goes to log_path (default: $SERVER_LOG, else /tmp/pagedserve-server.log). tree: run
    the pagedserve of that source tree (its directory first on PYTHONPATH, and the cwd).
    extra_env: variables set for the server (and the engine process it starts)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = log_path or os.environ.get("SERVER_LOG") or "/tmp/pagedserve-server.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.entrypoints.openai.api_server", "--model", model,
             "--port", str(port), "--host", "127.0.0.1", "--served-model-name", served_name, *server_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=tree, env=_server_env(tree, extra_env),
        )
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited during start-up; see {log_path}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield base, time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rates", type=float, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--server-args", default="", help="extra flags for the server")
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="TTFT objective of the goodput columns")
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0, help="TPOT objective of the goodput columns")
    parser.add_argument("--warmup-requests", type=int, default=0,
                        help="sent first at 32 req/s and not reported (JIT, allocator and graph warm-up)")
    parser.add_argument("--client-procs", type=int, default=default_client_procs(),
                        help="client processes sending the requests (default: one per 4 cores, at most 8)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    with running_server(args.model, args.server_args.split()) as (base, ready):
        work = sharegpt_like(args.vocab_size, args.num_requests)
        if args.warmup_requests:
            n = args.warmup_requests
            measure_rate(base, "bench", work.prompts[:n], work.output_lens[:n], 32.0, seed=1000,
                         client_procs=args.client_procs)
        rows = []
        for i, rate in enumerate(args.rates):
            rows.append(measure_rate(base, "bench", work.prompts, work.output_lens, rate, seed=i,
                                     slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                                     client_procs=args.client_procs))
            print_table("serving (so far)", rows)
    print(f"server ready in {ready:.1f} s")
    print_table("OpenAI server, Poisson arrivals, ShareGPT-like mix (ms)", rows)
    write_json(args.json, {"serving": rows, "server_ready_s": ready, "args": vars(args)})


if __name__ == "__main__":
    main()
