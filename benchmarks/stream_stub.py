"""A stand-in OpenAI completions server that streams tokens on a known schedule, to check the
load generator (benchmarks/serving.py) itself: does it see the TPOT the server sends?

Each request gets its first token after --ttft-ms and then one token every --tpot-ms (absolute
times from the request's arrival, so the server's own lag cannot accumulate), `max_tokens` in all,
as `text_completion` SSE chunks. One ticker task writes every due token of every open stream, so
the stub costs a few microseconds per token and its send times are recorded: GET /send_log
returns, per finished request, its TPOT as sent.

    python -m benchmarks.stream_stub --port 8123 [--tpot-ms 30] [--ttft-ms 20]

Plain asyncio streams and hand-written HTTP/1.1 (chunked transfer encoding): the stub must be
far cheaper than what it measures. It answers only what benchmarks/serving.py sends.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import time
from dataclasses import dataclass, field

_CHUNK = b'data: {"object":"text_completion","choices":[{"index":0,"text":"x","finish_reason":null}]}\n\n'
_DONE = b"data: [DONE]\n\n"


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


@dataclass(order=True)
class _Stream:
    due: float
    seq: int
    writer: asyncio.StreamWriter = field(compare=False)
    left: int = field(compare=False)
    sent: list[float] = field(default_factory=list, compare=False)


class StreamStub:
    def __init__(self, tpot_s: float, ttft_s: float) -> None:
        self.tpot_s, self.ttft_s = tpot_s, ttft_s
        self.heap: list[_Stream] = []
        self.wake = asyncio.Event()
        self.sent_tpot_s: list[float] = []  # per finished request: (last send - first) / (n - 1)
        self._seq = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path = lines[0].split(" ")[:2]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length) if length else b""
        if method == "GET":
            payload = json.dumps({"sent_tpot_s": self.sent_tpot_s}).encode() if path == "/send_log" else b"{}"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
            await writer.drain()
            writer.close()
            return
        tokens = max(1, int(json.loads(body).get("max_tokens", 16)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")  # fmt: skip
        self._seq += 1
        heapq.heappush(self.heap, _Stream(time.monotonic() + self.ttft_s, self._seq, writer, tokens))
        self.wake.set()

    async def ticker(self) -> None:
        while True:
            if not self.heap:
                self.wake.clear()
                await self.wake.wait()
                continue
            now = time.monotonic()
            if self.heap[0].due > now:
                self.wake.clear()
                with _suppress_timeout():
                    await asyncio.wait_for(self.wake.wait(), self.heap[0].due - now)
                continue
            while self.heap and self.heap[0].due <= now:
                stream = heapq.heappop(self.heap)
                stream.writer.write(_chunked(_CHUNK))
                stream.sent.append(time.monotonic())
                stream.left -= 1
                if stream.left > 0:
                    stream.due += self.tpot_s
                    heapq.heappush(self.heap, stream)
                else:
                    stream.writer.write(_chunked(_DONE) + b"0\r\n\r\n")
                    stream.writer.close()
                    if len(stream.sent) > 1:
                        self.sent_tpot_s.append((stream.sent[-1] - stream.sent[0]) / (len(stream.sent) - 1))
            await asyncio.sleep(0)


class _suppress_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *rest: object) -> bool:
        return kind is TimeoutError or kind is asyncio.TimeoutError


async def serve(port: int, tpot_s: float, ttft_s: float) -> None:
    stub = StreamStub(tpot_s, ttft_s)
    server = await asyncio.start_server(stub.handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await asyncio.gather(server.serve_forever(), stub.ticker())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--tpot-ms", type=float, default=30.0)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.tpot_ms / 1e3, args.ttft_ms / 1e3))


if __name__ == "__main__":
    main()
