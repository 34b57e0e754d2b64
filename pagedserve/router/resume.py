"""Splicing a stream across backends: what was sent, what to ask the next backend, how to rewrite
its chunks so the client sees one well-formed stream.

Every attempt asks its backend for `stream_options: {include_usage, continuous_usage_stats}` and
`return_token_ids` (vLLM's extras), so each chunk carries the token counts so far and the generated
token ids. After a break the next backend gets a continuation:

    completions  prompt = prompt token ids + generated token ids, on /v1/completions
    chat         when the backend returned token ids (pagedserve, recent vLLM): the same, on
                 /v1/completions with the chat prompt's ids, its text chunks turned back into chat
                 deltas. Exact: nothing is re-tokenized, so a greedy stream equals the undisturbed one.
                 Otherwise: messages + [{"role": "assistant", "content": <text sent so far>}],
                 continue_final_message=true, add_generation_prompt=false on /v1/chat/completions
                 (exact only where the text re-tokenizes to the same ids).
    both         max_tokens (max_completion_tokens) and min_tokens reduced by the tokens sent

The client's chunks all carry the first attempt's id / created / model; a continuation's role
delta is dropped; per-chunk usage is removed unless the client asked for continuous usage (then it
is the spliced total), and the final usage chunk is the router's own: the original prompt's tokens
plus every token the client received. Only n=1, single-prompt requests are resumable; others fail
over only before their first byte.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)
Route = Literal["chat", "completions"]
Detokenize = Callable[[list[int]], Awaitable[str | None]]
SETTLE_MAX_BACKOFF = 16  # held-back ids looked for at a resume (a UTF-8 sequence spans a few tokens)
COMPLETIONS_PATH = "/v1/completions"
# Chat-only request fields, dropped when a chat stream continues on /v1/completions.
_CHAT_ONLY = ("messages", "tools", "tool_choice", "parallel_tool_calls", "chat_template", "chat_template_kwargs",
              "add_generation_prompt", "continue_final_message", "add_special_tokens", "echo",
              "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "documents")  # fmt: skip


class UpstreamError(Exception):
    """The backend failed (an error event with a 5xx code inside its stream, or no [DONE])."""


def _int(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def resumable(route: Route, body: dict[str, Any]) -> bool:
    if _int(body.get("n"), 1) != 1:
        return False
    if route == "completions":
        prompt = body.get("prompt")
        return isinstance(prompt, str) or (
            isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)
        )
    # A grammar-constrained reply (forced tools, response_format, guided_*) cannot be continued
    # from the middle: the grammar would restart at the partial text.
    constrained = ("response_format", "structured_outputs", "guided_json", "guided_regex",
                   "guided_choice", "guided_grammar")  # fmt: skip
    fmt = body.get("response_format")
    if any(body.get(k) is not None for k in constrained if k != "response_format") or (
        isinstance(fmt, dict) and fmt.get("type") not in (None, "text")
    ):
        return False
    return body.get("tool_choice") in (None, "none", "auto")


@dataclass
class StreamState:
    route: Route
    body: dict[str, Any]  # the client's request, unchanged
    id: str | None = None
    created: int | None = None
    model: str | None = None
    text: str = ""  # generated text the client has received (choice 0)
    token_ids: list[int] = field(default_factory=list)  # completions: generated ids received
    prompt_token_ids: list[int] | None = None
    prompt_tokens: int | None = None  # of the original prompt
    tokens_before: int = 0  # completion tokens received in earlier attempts
    attempt_tokens: int = 0  # completion tokens received in this attempt
    continuing: bool = False  # the current attempt is a continuation (text was sent before it)
    via_completions: bool = False  # the current chat attempt runs on /v1/completions (token ids)
    resent_ids: int = 0  # regenerated ids the client already has (return_token_ids): not sent twice
    role_sent: bool = False
    finished: bool = False  # a finish_reason reached the client
    client_error: bool = False  # an in-stream 4xx error was forwarded: nothing to resume

    @property
    def include_usage(self) -> bool:
        opts = self.body.get("stream_options")
        return isinstance(opts, dict) and bool(opts.get("include_usage", True))

    @property
    def continuous_usage(self) -> bool:
        opts = self.body.get("stream_options")
        return self.include_usage and isinstance(opts, dict) and bool(opts.get("continuous_usage_stats"))

    @property
    def sent_tokens(self) -> int:
        return self.tokens_before + self.attempt_tokens

    @property
    def has_progress(self) -> bool:
        return bool(self.text) or bool(self.token_ids)

    def _max_tokens_key(self) -> str | None:
        if self.route == "completions":
            return "max_tokens"
        for key in ("max_completion_tokens", "max_tokens"):
            if _int(self.body.get(key), None) is not None:
                return key
        return None

    def remaining_tokens(self) -> int | None:
        key = self._max_tokens_key()
        if key is None:
            return None
        limit = _int(self.body.get(key), 16 if self.route == "completions" else None)
        return None if limit is None else limit - self.sent_tokens

    # Requests --------------------------------------------------------------------------------

    def token_exact(self) -> bool:
        """Whether the ids already sent are known exactly (every token reached us with its id)."""
        if self.prompt_token_ids is None or len(self.token_ids) != self.attempt_tokens + self.tokens_before:
            return False
        return self.route == "completions" or not self.body.get("logprobs")

    def drop_tokens(self, k: int) -> None:
        """Forget the last k generated ids: their text never reached the client (the server's
        detokenizer held it back, waiting for the rest of a UTF-8 sequence), so the next backend
        regenerates them and sends their text."""
        if k <= 0:
            return
        del self.token_ids[-k:]
        self.resent_ids += k
        from_attempt = min(k, self.attempt_tokens)
        self.attempt_tokens -= from_attempt
        self.tokens_before -= k - from_attempt

    def next_request(self, path: str) -> tuple[str, dict[str, Any]]:
        """(path, body) of the next attempt: the original, or a continuation once text was sent."""
        b = dict(self.body)
        b["stream"] = True
        b["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        b["return_token_ids"] = True
        exact = self.token_exact()
        # Tokens of an attempt that sent no text are discarded with it (the retry regenerates them).
        self.tokens_before = self.tokens_before + self.attempt_tokens if self.has_progress else 0
        self.attempt_tokens = 0
        self.continuing = self.has_progress
        self.via_completions = False
        if not self.has_progress:
            self.token_ids = []
            return path, b
        key, remaining = self._max_tokens_key(), self.remaining_tokens()
        if exact:
            assert self.prompt_token_ids is not None
            if self.route == "chat":
                b = {k: v for k, v in b.items() if k not in _CHAT_ONLY}
                self.via_completions, path, key = True, COMPLETIONS_PATH, "max_tokens" if key else None
            b["prompt"] = self.prompt_token_ids + self.token_ids
            b["echo"] = False
        else:
            messages = list(b.get("messages") or [])
            if b.get("continue_final_message") and messages:
                last = dict(messages[-1])
                last["content"] = _content_text(last.get("content")) + self.text
                messages[-1] = last
            else:
                messages.append({"role": "assistant", "content": self.text})
            b.update(messages=messages, continue_final_message=True, add_generation_prompt=False, echo=False)
        if key is not None and remaining is not None:
            b[key] = remaining
        min_tokens = _int(b.get("min_tokens"), 0) or 0
        if min_tokens:
            b["min_tokens"] = max(0, min_tokens - self.sent_tokens)
        return path, b

    # Chunks ----------------------------------------------------------------------------------

    def rewrite(self, data: dict[str, Any]) -> str | None:
        """One upstream chunk -> the client's event (None: nothing to send)."""
        if "error" in data:
            err = data.get("error") or {}
            code = _int(err.get("code"), 500) if isinstance(err, dict) else 500
            if code is None or code >= 500:
                raise UpstreamError(f"backend error in stream: {err}")
            self.client_error = True
            return _event(data)
        if self.id is None:
            self.id, self.created, self.model = data.get("id"), data.get("created"), data.get("model")
        data["id"], data["created"], data["model"] = self.id, self.created, self.model
        usage = data.get("usage")
        if isinstance(usage, dict):
            if self.prompt_tokens is None and not self.continuing:
                self.prompt_tokens = _int(usage.get("prompt_tokens"), None)
            self.attempt_tokens = _int(usage.get("completion_tokens"), self.attempt_tokens) or 0
        top_ids = data.pop("prompt_token_ids", None)  # chat: on the first chunk with tokens
        if isinstance(top_ids, list) and self.prompt_token_ids is None and not self.continuing:
            self.prompt_token_ids = [int(t) for t in top_ids]
        choices = data.get("choices") or []
        if not choices:
            return None  # the upstream's final usage chunk: the router sends its own
        if self.via_completions:
            data["object"] = "chat.completion.chunk"
            choices = [_as_chat_choice(c) for c in choices]
        kept = [c for c in (self._choice(c) for c in choices) if c is not None]
        if not kept:
            return None
        data["choices"] = kept
        data["usage"] = self.usage() if self.continuous_usage else None
        if self.route == "chat":
            asked = self.body.get("return_token_ids") and not self.continuing
            data["prompt_token_ids"] = top_ids if asked else None
        return _event(data)

    def _choice(self, c: dict[str, Any]) -> dict[str, Any] | None:
        if c.get("finish_reason") is not None:
            self.finished = True
        ids = c.get("token_ids")
        if isinstance(ids, list):
            self.token_ids += [int(t) for t in ids]
            skip = min(len(ids), self.resent_ids)
            self.resent_ids -= skip
            c["token_ids"] = ids[skip:]
        if not self.body.get("return_token_ids"):
            c["token_ids"] = None  # the server's shape: the key is there, null unless asked for
        if self.route == "chat":
            delta = dict(c.get("delta") or {})
            if delta.get("role") is not None:
                if self.role_sent:
                    delta.pop("role")
                self.role_sent = True
            self.text += str(delta.get("content") or "")
            if not delta.get("role") and not delta.get("content") and c.get("finish_reason") is None \
                    and not delta.get("tool_calls") and c.get("logprobs") is None and not c.get("token_ids"):
                return None  # e.g. a continuation's empty role delta
            c["delta"] = delta
            return c
        self.text += str(c.get("text") or "")
        prompt_ids = c.get("prompt_token_ids")
        if isinstance(prompt_ids, list) and self.prompt_token_ids is None:
            self.prompt_token_ids = [int(t) for t in prompt_ids]
            if self.prompt_tokens is None:
                self.prompt_tokens = len(self.prompt_token_ids)
        if not self.body.get("return_token_ids"):
            c["prompt_token_ids"] = None
        elif self.continuing:
            c["prompt_token_ids"] = None  # a continuation's prompt is not the client's prompt
        return c

    def usage(self) -> dict[str, int]:
        prompt = self.prompt_tokens or 0
        return {"prompt_tokens": prompt, "completion_tokens": self.sent_tokens,
                "total_tokens": prompt + self.sent_tokens}  # fmt: skip

    def _envelope(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.route == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created or int(time.time()),
                "model": self.model, "choices": choices, "usage": usage}  # fmt: skip

    def length_finish(self) -> str:
        """The finish chunk for a stream that broke after its last token but before its finish."""
        self.finished = True
        if self.route == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
        return _event(self._envelope([choice], self.usage() if self.continuous_usage else None))

    def final_usage(self) -> str | None:
        if not self.include_usage or self.client_error:
            return None
        return _event(self._envelope([], self.usage()))


async def settle(state: StreamState, detokenize: Detokenize) -> None:
    """Finds how many of the generated ids the client has the text of: the longest prefix of them
    that decodes to exactly the text sent. Ids past it were held back by the dead backend's
    detokenizer (an incomplete UTF-8 sequence) and are regenerated by the next one. Without a
    detokenizer, or when no prefix matches, every id counts as sent."""
    ids = state.token_ids
    for j in range(len(ids), max(-1, len(ids) - SETTLE_MAX_BACKOFF - 1), -1):
        text = await detokenize(ids[:j]) if j else ""
        if text is None:
            return
        if text == state.text:
            if j < len(ids):
                logger.info("resume: %d held-back token(s) will be regenerated", len(ids) - j)
            state.drop_tokens(len(ids) - j)
            return


def _as_chat_choice(c: dict[str, Any]) -> dict[str, Any]:
    """A /v1/completions stream choice as a chat one (a continuation of a chat stream)."""
    out = {"index": c.get("index", 0), "delta": {"content": c.get("text") or ""}, "logprobs": None,
           "finish_reason": c.get("finish_reason"), "stop_reason": c.get("stop_reason")}  # fmt: skip
    if "token_ids" in c:
        out["token_ids"] = c["token_ids"]
    return out


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
