"""How many streamed tokens a second the OpenAI server's front end delivers, with the engine
taken out: the real server process (FastAPI, uvicorn, middlewares, AsyncLLM, the output processor,
detokenization, SSE) in front of a paced stand-in for the engine core that emits one token per
running request every --step-ms, as a decode step does.

    python -m benchmarks.frontend_stream [--streams 100 300] [--step-ms 30] [--tokens 200] [--json OUT]

Why: on the H200 at 81 req/s both servers' streams arrived in bursts (ITL P50 0.03 ms, P99
0.4-1.4 s) with a client that keeps up (benchmarks/client_check.py), so the front end, one
Python process, lags the engine. Per row: the server process's CPU time per delivered token
(utime + stime from /proc over the run), the delivered token rate, and the TPOT the clients saw
against the stand-in's step. The clients are raw asyncio readers in their own processes that
count SSE events (no JSON parsing), cheap beside the server. Where the server's CPU per token
times the offered rate approaches one second per second, the front end is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np

from benchmarks.common import environment, print_table, write_json
from benchmarks.serving import free_port
from pagedserve.core.outputs import EngineCoreOutput, FinishReason
from pagedserve.engine.messages import OutputsMsg

# ---------------------------------------------------------------------------- the stand-in core


class PacedCore:
    """An EngineCoreClient that runs no model: every `step_s` it emits one token for each live
    child (`max_tokens` in all, then finish_reason length), through on_outputs, on the loop."""

    def __init__(self, step_s: float, vocab_size: int) -> None:
        from pagedserve.engine.core_client import DeadHandler, OutputHandler

        self.step_s, self.vocab_size = step_s, vocab_size
        self.on_outputs: OutputHandler = lambda msg: None
        self.on_dead: DeadHandler = lambda reason: None
        self.is_alive, self.dead_reason = True, None
        self.live: dict[str, list[int]] = {}  # child id -> [tokens left, next token id]
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None

    async def start(self, timeout_s: float = 600.0) -> Any:
        from pagedserve.engine.messages import ReadyMsg

        self._task = asyncio.get_running_loop().create_task(self._run())
        return ReadyMsg(pid=os.getpid(), num_gpu_blocks=100_000, num_cpu_blocks=0, block_size=16,
                        kv_capacity_tokens=1_600_000, vocab_size=self.vocab_size, startup_seconds=0.0)  # fmt: skip

    def add_request(self, msg: Any) -> None:
        for child in msg.children:
            self.live[child.request_id] = [int(child.sampling_params.max_tokens or 16), 100]

    def abort(self, child_ids: list[str]) -> None:
        for child in child_ids:
            self.live.pop(child, None)

    def fresh(self) -> PacedCore:
        return PacedCore(self.step_s, self.vocab_size)

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        due = time.monotonic()
        while True:
            due += self.step_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            # Every step due by now, back to back without yielding: an engine steps at its own
            # pace, and a lagging loop finds that many reports in its socket, which the reader
            # (core_client.MPClient: zmq's recv returns at once while messages are buffered)
            # hands over one after the other.
            while True:
                self._step()
                if due + self.step_s > time.monotonic():
                    break
                due += self.step_s

    def _step(self) -> None:
        now = time.monotonic()
        outputs = []
        for child, state in list(self.live.items()):
            state[0] -= 1
            state[1] = 100 + (state[1] * 31 + 7) % (self.vocab_size - 200)
            done = state[0] <= 0
            outputs.append(EngineCoreOutput(child, [state[1]], FinishReason.LENGTH if done else None,
                                            first_scheduled_time=now))  # fmt: skip
            if done:
                del self.live[child]
        if outputs:
            self.on_outputs(OutputsMsg(outputs, None))


def serve(model: str, port: int, step_s: float) -> None:
    """The real server, its engine client replaced by PacedCore (this process only)."""
    import pagedserve.engine.async_llm as async_llm
    from pagedserve.entrypoints.openai.api_server import main as server_main
    from pagedserve.model_executor.model_spec import load_hf_config

    vocab = int(load_hf_config(model).vocab_size)
    async_llm.make_client = lambda config, multiprocess=True, log=None: PacedCore(step_s, vocab)  # type: ignore[assignment]
    profile_to = os.environ.get("FRONTEND_PROFILE")  # a path: cProfile the server, stats written at exit
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            _serve_main(server_main, model, port)
        finally:
            profiler.disable()
            profiler.dump_stats(profile_to)
        return
    _serve_main(server_main, model, port)


def _serve_main(server_main: Any, model: str, port: int) -> None:
    server_main(["--model", model, "--port", str(port), "--device", "cpu", "--max-model-len", "2048",
                 "--max-num-seqs", "1024", "--log-level", "WARNING", "--max-waiting-requests", "100000"])  # fmt: skip


# ---------------------------------------------------------------------------- the clients


async def _read_stream(port: int, body: bytes, start_at: float, out: list[list[float]]) -> None:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
    arrivals: list[float] = []
    while True:
        data = await reader.read(65536)
        if not data:
            break
        now = time.monotonic()
        arrivals.extend([now] * data.count(b'"text":'))  # events (a merged one may hold several tokens)
    writer.close()
    out.append(arrivals)


def _client(port: int, bodies: list[tuple[bytes, float]], t0: float, results: Any) -> None:
    async def run() -> list[list[float]]:
        out: list[list[float]] = []
        await asyncio.gather(*(_read_stream(port, b, t0 + s, out) for b, s in bodies))
        return out

    results.put(asyncio.run(run()))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, pid: int, model: str, streams: int, tokens: int, step_s: float,
            client_procs: int) -> dict[str, Any]:  # fmt: skip
    """`streams` requests of `tokens` tokens each, started together (spread over one step)."""
    body = json.dumps({"model": model, "prompt": [11, 12, 13, 14], "max_tokens": tokens, "stream": True,
                       "ignore_eos": True}).encode()  # fmt: skip
    items = [(body, step_s * i / streams) for i in range(streams)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    t0 = time.monotonic() + 1.0 + 0.3 * client_procs  # the client processes' start-up
    procs = [ctx.Process(target=_client, args=(port, items[k::client_procs], t0, results)) for k in range(client_procs)]
    for proc in procs:
        proc.start()
    time.sleep(max(0.0, t0 - time.monotonic()))
    cpu0, wall0 = _cpu_seconds(pid), time.monotonic()
    streams_seen = [a for _ in procs for a in results.get(timeout=600)]
    cpu, wall = _cpu_seconds(pid) - cpu0, time.monotonic() - wall0
    for proc in procs:
        proc.join(timeout=30)
    done = [a for a in streams_seen if a]
    delivered = len(done) * tokens  # ignore_eos: every finished stream carried `tokens` tokens
    events = sum(len(a) for a in done)
    tpot = [(a[-1] - a[0]) / (tokens - 1) for a in done] if tokens > 1 else [0.0]
    itl = [b - a for s in done for a, b in zip(s, s[1:])] or [0.0]
    return {
        "streams": streams, "tokens_per_stream": tokens, "step_ms": step_s * 1e3,
        "offered_tokens_per_s": streams / step_s, "delivered_tokens": delivered,
        "tokens_per_event": delivered / max(events, 1),
        "delivered_tokens_per_s": delivered / wall, "server_cpu_us_per_token": 1e6 * cpu / max(delivered, 1),
        "server_cpu_share": cpu / wall,
        "tpot_p50_ms": float(np.percentile(tpot, 50) * 1e3), "tpot_p99_ms": float(np.percentile(tpot, 99) * 1e3),
        "itl_p99_ms": float(np.percentile(itl, 99) * 1e3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="tokenizer and config (default: the tiny test Llama)")
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=30.0)
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.serve:
        serve(args.model, args.port, args.step_ms / 1e3)
        return
    if args.model is None:
        from pagedserve.testing.checkpoints import build_checkpoint

        args.model = build_checkpoint("/tmp/frontend-stream-llama", "llama")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.frontend_stream", "--serve", "--model", args.model,
                               "--port", str(port), "--step-ms", str(args.step_ms)])  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not become healthy")
            time.sleep(0.2)
        probe = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"model": args.model, "prompt": [11, 12], "max_tokens": 2})
        if probe.status_code != 200:
            raise RuntimeError(f"the server refused a completion: {probe.status_code} {probe.text[:300]}")
        rows = [measure(port, server.pid, args.model, n, args.tokens, args.step_ms / 1e3, args.client_procs)
                for n in args.streams]
    finally:
        server.terminate()
        server.wait(timeout=30)
    print_table(f"front end alone, stand-in core stepping every {args.step_ms:g} ms", rows)
    write_json(args.json, {"environment": environment(), "rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
