"""Is the load generator honest at this rate? benchmarks/serving.py's client against a stub server
that streams on a known schedule (benchmarks/stream_stub.py: TTFT --ttft-ms, then one token every
--tpot-ms), on the ShareGPT-like mix's output lengths, for 1 and more client processes.

    python -m benchmarks.client_check [--rate 81] [--num-requests 600] [--tpot-ms 30]
                                      [--client-procs 1 4] [--max-tokens N] [--json OUT]

A row's TTFT and TPOT are what the client measured; `sent_tpot_p99_ms` is what the stub sent
(it records its send times). Where they part, the client, not the server, sets the numbers:
serving benchmarks must then use more client processes (--client-procs).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np

from benchmarks.common import environment, print_table, write_json
from benchmarks.serving import free_port, measure_rate
from pagedserve.tune.workload import sharegpt_like


@contextlib.contextmanager
def running_stub(tpot_ms: float, ttft_ms: float) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.stream_stub", "--port", str(port),
                             "--tpot-ms", str(tpot_ms), "--ttft-ms", str(ttft_ms)])  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/send_log", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the stream stub did not start") from None
                time.sleep(0.1)
        yield base
    finally:
        proc.kill()
        proc.wait(timeout=10)


def check(rate: float, num_requests: int, tpot_ms: float, ttft_ms: float, client_procs: int,
          max_tokens: int | None = None) -> dict[str, Any]:
    """One run against a fresh stub: the client's summary plus what the stub sent."""
    work = sharegpt_like(1000, num_requests)
    lens = [min(n, max_tokens) for n in work.output_lens] if max_tokens else work.output_lens
    with running_stub(tpot_ms, ttft_ms) as base:
        row = measure_rate(base, "stub", work.prompts, lens, rate, seed=1, slo_ttft_ms=ttft_ms * 5,
                           slo_tpot_ms=tpot_ms * 1.1, client_procs=client_procs)  # fmt: skip
        sent = httpx.get(base + "/send_log", timeout=10).json()["sent_tpot_s"]
    row["sent_tpot_p50_ms"] = float(np.percentile(sent, 50) * 1e3) if sent else float("nan")
    row["sent_tpot_p99_ms"] = float(np.percentile(sent, 99) * 1e3) if sent else float("nan")
    row["stub_ttft_ms"] = ttft_ms
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=81.0)
    parser.add_argument("--num-requests", type=int, default=600)
    parser.add_argument("--tpot-ms", type=float, default=30.0)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--client-procs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-tokens", type=int, default=None, help="cap the mix's output lengths (shorter runs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [check(args.rate, args.num_requests, args.tpot_ms, args.ttft_ms, procs, args.max_tokens)
            for procs in args.client_procs]
    keys = ("client_procs", "rate_rps", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
            "tpot_p99_ms", "itl_p99_ms", "sent_tpot_p99_ms", "stub_ttft_ms")  # fmt: skip
    print_table(f"client check: stub sends TTFT {args.ttft_ms:g} ms, TPOT {args.tpot_ms:g} ms",
                [{k: r[k] for k in keys} for r in rows])
    write_json(args.json, {"environment": environment(), "rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
