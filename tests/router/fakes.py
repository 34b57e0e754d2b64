"""Small fake backends for the router tests: a FastAPI app in a uvicorn thread that speaks the
server's routes with a deterministic character-level "model", and can be told to fail.

The model: token ids are characters (ord), the next token is a function of the WHOLE context
(prompt ids + generated ids), so a continuation that re-submits prompt + generated reproduces the
undisturbed stream exactly, and any splicing mistake changes the text.

Chat prompt rendering: "role: content\n" per message, then "assistant: " (generation prompt); with
continue_final_message the last (assistant) message is rendered without its newline, so the
continuation's context is the original context plus the partial reply, as with a real template.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.server.conftest import free_port


def next_token(context: list[int], salt: int = 0) -> int:
    return 97 + (sum(context) * 31 + len(context) * 7 + salt) % 26


def generate(context: list[int], n: int, salt: int = 0) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(next_token(context + out, salt))
    return out


def render_chat(body: dict[str, Any]) -> str:
    msgs = body["messages"]
    cont = body.get("continue_final_message", False)
    text = ""
    for i, m in enumerate(msgs):
        last = i == len(msgs) - 1
        text += f"{m['role']}: {m.get('content') or ''}" + ("" if (cont and last) else "\n")
    if body.get("add_generation_prompt", True) and not cont:
        text += "assistant: "
    return text


class Cut(Exception):
    """Raised inside a streaming body: uvicorn drops the connection mid-body (a dead backend)."""


@dataclass
class Behaviour:
    health: int = 200
    status: int | None = None  # answer generation routes with this error status
    die_after: int | None = None  # cut streams after this many tokens (once per request)
    die_at_end: bool = False  # cut streams after the finish chunk, before the usage and [DONE]
    die_non_stream: bool = False
    no_token_ids: bool = False  # an older server: ignores return_token_ids
    salt: int = 0  # a different "model" (for shadow disagreement)
    hold_back: tuple[int, ...] = ()  # positions whose text is sent with the next token (a split UTF-8 char)  # drop the connection instead of answering non-streamed requests
    delay_s: float = 0.0  # per streamed token
    cut_remaining: int = 10**9  # how many more requests may be cut


@dataclass
class FakeBackend:
    name: str
    behaviour: Behaviour = field(default_factory=Behaviour)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    port: int = 0
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gen_bodies(self) -> list[dict[str, Any]]:
        return [b for b in self.bodies if "messages" in b or "prompt" in b]

    def app(self) -> FastAPI:
        app = FastAPI()
        beh = self.behaviour

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=beh.health)

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": self.name}]})

        @app.post("/detokenize")
        async def detokenize(raw: Request) -> JSONResponse:
            return JSONResponse({"prompt": "".join(map(chr, (await raw.json())["tokens"]))})

        @app.post("/v1/completions")
        async def completions(raw: Request) -> Response:
            self.auth_headers.append(raw.headers.get("authorization"))
            return await self._generate(await raw.json(), chat=False)

        @app.post("/v1/chat/completions")
        async def chat(raw: Request) -> Response:
            self.auth_headers.append(raw.headers.get("authorization"))
            return await self._generate(await raw.json(), chat=True)

        return app

    async def _generate(self, body: dict[str, Any], chat: bool) -> Response:
        beh = self.behaviour
        self.bodies.append(body)
        if beh.status is not None:
            err = {"error": {"message": f"{self.name} fails", "type": "server_error", "param": None, "code": beh.status}}
            return JSONResponse(err, status_code=beh.status)
        if chat:
            prompt_text = render_chat(body)
            prompt = [ord(c) for c in prompt_text]
            limit = body.get("max_completion_tokens") or body.get("max_tokens") or 12
        else:
            p = body["prompt"]
            prompt = list(p) if isinstance(p, list) else [ord(c) for c in p]
            limit = body.get("max_tokens", 16)
        ids = generate(prompt, limit, beh.salt)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.name}-{len(self.bodies)}"
        if not body.get("stream"):
            if beh.die_non_stream and beh.cut_remaining > 0:
                beh.cut_remaining -= 1
                raise Cut()
            text = "".join(map(chr, ids))
            usage = {"prompt_tokens": len(prompt), "completion_tokens": len(ids), "total_tokens": len(prompt) + len(ids)}
            if chat:
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "length"}
            else:
                choice = {"index": 0, "text": text, "finish_reason": "length",
                          "token_ids": ids if body.get("return_token_ids") else None}
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": 1, "model": "fake", "choices": [choice], "usage": usage,
                                 "served_by": self.name})
        return StreamingResponse(self._stream(body, chat, rid, prompt, ids), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any], chat: bool, rid: str, prompt: list[int],
                      ids: list[int]) -> AsyncIterator[str]:
        beh = self.behaviour
        opts = body.get("stream_options") or {}
        cont = bool(opts.get("continuous_usage_stats"))
        obj = "chat.completion.chunk" if chat else "text_completion"
        cut_at = beh.die_after if (beh.die_after is not None and beh.cut_remaining > 0) else None
        if cut_at is not None:
            beh.cut_remaining -= 1

        want_ids = bool(body.get("return_token_ids")) and not beh.no_token_ids

        def chunk(choices: list[dict[str, Any]], n: int, **extra: Any) -> str:
            usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": 1000 + len(self.bodies),
                                          "model": "fake", "choices": choices,
                                          "usage": usage if cont else None, **extra}) + "\n\n"

        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], 0)
        held = ""
        for i, t in enumerate(ids):
            if cut_at is not None and i == cut_at:
                raise Cut()
            if beh.delay_s:
                await asyncio.sleep(beh.delay_s)
            reason = "length" if i == len(ids) - 1 else None
            piece, held = ("", held + chr(t)) if i in beh.hold_back else (held + chr(t), "")
            if chat:
                c: dict[str, Any] = {"index": 0, "delta": {"content": piece}, "finish_reason": reason,
                                     "token_ids": [t] if want_ids else None}
                yield chunk([c], i + 1, prompt_token_ids=prompt if (i == 0 and want_ids) else None)
                continue
            c = {"index": 0, "text": piece, "finish_reason": reason,
                 "prompt_token_ids": prompt if (i == 0 and want_ids) else None,
                 "token_ids": [t] if want_ids else None}
            yield chunk([c], i + 1)
        if beh.die_at_end:
            raise Cut()
        if opts.get("include_usage"):
            yield "data: " + json.dumps({"id": rid, "object": obj, "created": 1, "model": "fake", "choices": [],
                                         "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                                                   "total_tokens": len(prompt) + len(ids)}}) + "\n\n"
        yield "data: [DONE]\n\n"

    # Lifecycle -------------------------------------------------------------------------------

    def start(self, port: int | None = None) -> FakeBackend:
        self.port = port or self.port or free_port()
        self.server, self.thread = serve_in_thread(self.app(), self.port)
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            stop_thread_server(self.server, self.thread)
            self.server = self.thread = None


def serve_in_thread(app: Any, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError(f"server on port {port} did not start")
        time.sleep(0.02)
    return server, thread


def stop_thread_server(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(10)


def expected_completion(prompt: str | list[int], n: int) -> str:
    ids = list(prompt) if isinstance(prompt, list) else [ord(c) for c in prompt]
    return "".join(map(chr, generate(ids, n)))


def expected_chat(messages: list[dict[str, Any]], n: int) -> str:
    ids = [ord(c) for c in render_chat({"messages": messages})]
    return "".join(map(chr, generate(ids, n)))


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parsed `data:` payloads of an SSE stream ("[DONE]" kept as the string)."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
