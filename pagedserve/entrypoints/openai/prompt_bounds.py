"""Bounded prompt work: chat-template rendering and tokenization off the event loop, with a
time bound, size bounds and the request-template trust rule.

Why: a chat template is code. Rendered on the asyncio loop, two nested Jinja loops stall every
client for seconds (three, for hours), and tokenizing a 10 MB prompt stalls all traffic for
seconds. So:

  * a template a request supplies (`chat_template`, or `chat_template_kwargs["chat_template"]`)
    is refused with a 400 unless the server runs with --trust-request-chat-template (vLLM's flag);
  * every render runs in a small worker pool under a deadline (--chat-template-timeout); the
    rendering itself is interruptible: while it runs, a per-thread trace function watches the
    frames of compiled Jinja code (filename "<template>") and raises TemplateTimeout on the first
    line executed after the deadline, so a runaway loop ends instead of burning a worker forever;
  * prompt text longer than --max-prompt-chars is refused (400) before it is tokenized, and the
    rendered template output is held to the same bound; large inputs tokenize in the pool too
    (the Rust tokenizer releases the GIL, so the loop keeps serving).

Limit: a single C-level operation inside a trusted template (say `"x" * 10**9`) cannot be
interrupted by a trace function; that is one of the reasons request templates are off by default.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

from pagedserve.entrypoints.openai.errors import BadRequestError

T = TypeVar("T")

JINJA_FILENAME = "<template>"  # what jinja2 names code compiled from a string (Template.from_string)
DEFAULT_RENDER_TIMEOUT_S = 5.0
DEFAULT_MAX_PROMPTS = 1024
MIN_DEFAULT_PROMPT_CHARS = 1 << 20
CHARS_PER_TOKEN_BOUND = 32  # default --max-prompt-chars = this * max_model_len (at least 1 MiB)
OFFLOAD_CHARS = 16384  # shorter texts tokenize inline: microseconds, less than a thread hop
_POOL_SIZE = 4  # > 1: one runaway render (until its deadline) never queues the others behind it


def default_max_prompt_chars(max_model_len: int) -> int:
    return max(MIN_DEFAULT_PROMPT_CHARS, CHARS_PER_TOKEN_BOUND * max_model_len)


@dataclass(slots=True, frozen=True)
class PromptBounds:
    max_prompts: int = DEFAULT_MAX_PROMPTS  # per request, counted as len(prompts) * n
    max_prompt_chars: int = MIN_DEFAULT_PROMPT_CHARS  # per prompt text and per rendered template
    render_timeout_s: float = DEFAULT_RENDER_TIMEOUT_S
    trust_request_chat_template: bool = False

    def __post_init__(self) -> None:
        if self.max_prompts < 1 or self.max_prompt_chars < 1 or self.render_timeout_s <= 0:
            raise ValueError(f"prompt bounds must be positive, got {self}")

    # ---------------------------------------------------------------- checks (cheap, on the loop)

    def check_num_prompts(self, num_prompts: int, n: int = 1) -> None:
        if num_prompts * n > self.max_prompts:
            raise BadRequestError(
                f"This request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; "
                f"the limit is {self.max_prompts} (--max-prompts-per-request).", param="prompt",
            )  # fmt: skip

    def check_chars(self, text: str, param: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise BadRequestError(
                f"The prompt has {len(text)} characters; the limit is {self.max_prompt_chars} "
                "(--max-prompt-chars). Please shorten the prompt.", param=param,
            )  # fmt: skip

    def check_request_template(self, chat_template: str | None, kwargs: dict[str, Any] | None) -> None:
        """A template from the request runs caller-written code: only with the trust flag."""
        supplied = chat_template is not None or bool(kwargs and "chat_template" in kwargs)
        if supplied and not self.trust_request_chat_template:
            raise BadRequestError(
                "A chat template in the request is not accepted: this server does not trust "
                "request-supplied chat templates (start it with --trust-request-chat-template).",
                param="chat_template",
            )


# ---------------------------------------------------------------------------- the deadline


class TemplateTimeout(Exception):
    """Raised inside a render that passed its deadline."""


def call_with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """Runs fn() in this thread; Jinja template code it runs raises TemplateTimeout after timeout_s.

    sys.settrace is per thread: only this worker is traced, and only frames of compiled templates
    get a local (line) tracer, so library code runs untraced apart from the call hook. The
    previous trace function (a debugger's, coverage's) is put back afterwards. CPython drops a
    trace function that raises, so the timeout is raised once and unwinds normally.
    """
    deadline = time.monotonic() + timeout_s

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateTimeout(f"the chat template did not finish within {timeout_s:g} s")
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == JINJA_FILENAME:
            return on_line(frame, event, arg)  # a (resumed) template frame: check now, trace lines
        return None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return fn()
    finally:
        sys.settrace(previous)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="pagedserve-prompt")
        return _pool


async def off_loop(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(_executor(), fn)


# ---------------------------------------------------------------------------- bounded operations


async def render_chat_template(engine: Any, bounds: PromptBounds, **kwargs: Any) -> str:
    """engine.apply_chat_template(**kwargs) in the pool under the deadline; 400 on any failure."""
    job = functools.partial(engine.apply_chat_template, **kwargs)
    try:
        text: str = await off_loop(functools.partial(call_with_deadline, job, bounds.render_timeout_s))
    except TemplateTimeout as e:
        raise BadRequestError(f"{e} (--chat-template-timeout).", param="chat_template") from None
    except Exception as e:  # noqa: BLE001 - jinja errors, templates raising on bad roles
        raise BadRequestError(f"The chat template failed on these messages: {e}", param="messages") from None
    if len(text) > bounds.max_prompt_chars:
        raise BadRequestError(
            f"The chat template rendered {len(text)} characters; the limit is {bounds.max_prompt_chars} "
            "(--max-prompt-chars).", param="messages",
        )  # fmt: skip
    return text


async def encode(tokenizer: Any, bounds: PromptBounds, text: str, param: str, **kwargs: Any) -> list[int]:
    """tokenizer.encode(text, **kwargs) after the size check; long texts in the pool."""
    bounds.check_chars(text, param)
    if len(text) < OFFLOAD_CHARS:
        return list(tokenizer.encode(text, **kwargs))
    return list(await off_loop(functools.partial(tokenizer.encode, text, **kwargs)))


async def tokenize_prompt(engine: Any, bounds: PromptBounds, prompt: Any, param: str = "prompt"
                          ) -> tuple[str | None, list[int]]:  # fmt: skip
    """engine.tokenize_prompt with the size check; long texts in the pool."""
    if isinstance(prompt, str):
        bounds.check_chars(prompt, param)
        if len(prompt) >= OFFLOAD_CHARS:
            result: tuple[str | None, list[int]] = await off_loop(
                functools.partial(engine.tokenize_prompt, prompt)
            )
            return result
    return engine.tokenize_prompt(prompt)  # type: ignore[no-any-return]


async def decode(tokenizer: Any, token_ids: list[int]) -> str:
    if len(token_ids) < OFFLOAD_CHARS // 4:
        return str(tokenizer.decode(token_ids))
    return str(await off_loop(functools.partial(tokenizer.decode, token_ids)))
