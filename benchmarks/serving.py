"""The OpenAI server under Poisson arrivals: TTFT, TPOT and inter-token latency (P50/P99) and the
achieved throughput, at several request rates, on the ShareGPT-like mix (ignore_eos, streamed).

Starts `python -m pagedserve.entrypoints.openai.api_server` itself, waits for /health, then for
each rate sends `--num-requests` streamed /v1/completions requests (token-id prompts) whose
inter-arrival gaps are exponential with mean 1/rate (seeded).

    python -m benchmarks.serving --model DIR [--rates 4 8 16 32] [--num-requests 500] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

from benchmarks.common import print_table, write_json
from benchmarks.workload import sharegpt_like


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
               delay: float, record: list[dict]) -> None:
    await asyncio.sleep(delay)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 1.0}
    sent = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            record.append({"ok": False, "status": response.status_code})
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                arrivals.append(time.perf_counter())
    done = time.perf_counter()
    record.append({"ok": True, "sent": sent, "arrivals": arrivals, "done": done, "tokens": max_tokens})


async def run_rate(base: str, model: str, prompts, out_lens, rate: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, len(prompts))
    starts = np.cumsum(gaps) - gaps[0]
    record: list[dict] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(*(
            _one(client, base + "/v1/completions", model, p, n, float(s), record)
            for p, n, s in zip(prompts, out_lens, starts)
        ))
        elapsed = time.perf_counter() - began
    ok = [r for r in record if r["ok"]]
    ttft = [r["arrivals"][0] - r["sent"] for r in ok if r["arrivals"]]
    tpot = [(r["done"] - r["arrivals"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1 and r["arrivals"]]
    itl = [b - a for r in ok for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["tokens"] for r in ok)

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q) * 1e3) if values else float("nan")

    return {
        "rate_rps": rate, "requests": len(prompts), "failed": len(record) - len(ok),
        "elapsed_s": elapsed, "achieved_rps": len(ok) / elapsed, "output_tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
        "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rates", type=float, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--server-args", default="", help="extra flags for the server")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(os.environ.get("SERVER_LOG", "/tmp/pagedserve-server.log"), "w")
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.entrypoints.openai.api_server", "--model", args.model,
         "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "bench",
         *args.server_args.split()],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError("the server exited during start-up; see its log")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ready = time.perf_counter() - started
        work = sharegpt_like(args.vocab_size, args.num_requests)
        rows = []
        for i, rate in enumerate(args.rates):
            rows.append(asyncio.run(run_rate(base, "bench", work.prompts, work.output_lens, rate, seed=i)))
            print_table("serving (so far)", rows)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"server ready in {ready:.1f} s")
    print_table("OpenAI server, Poisson arrivals, ShareGPT-like mix (ms)", rows)
    write_json(args.json, {"serving": rows, "server_ready_s": ready, "args": vars(args)})


if __name__ == "__main__":
    main()
