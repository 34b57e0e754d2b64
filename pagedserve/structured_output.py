"""Structured outputs: grammars compiled with xgrammar and the per-request matchers that mask the
logits token by token (SamplingParams.structured_outputs).

    spec (json schema | json_object | regex | choice | EBNF)
      -> compiled grammar  (compiled ONCE per spec digest, see below)
      -> GrammarMatcher    (one per request, fed every sampled token; rebuilt after preemption
                            by replaying the tokens generated so far)
      -> token bitmask     ([N, ceil(vocab / 32)] int32, 1 bit per allowed token) applied to the
                            logits before sampling; the grammar's end admits the EOS token.

Where the one compile happens:
  * server: the HTTP process compiles in a killable worker process (engine/grammar_pool.py),
    off the event loop and under a deadline, and ships the serialized grammar with the request;
    the engine process only deserializes it (engine/grammars.py, in a background thread:
    xgrammar releases the GIL there, so steps go on meanwhile).
  * offline (LLM / LLMEngine): the request builder compiles into the engine's own cache, before
    the request reaches the scheduler.
Nothing compiles in the step loop. The engine core builds each request's matcher from the grammar
ready in this cache, fills the step's bitmask after scheduling (engine/grammars.py) and hands it to
the worker with the plan (SchedulerOutput.grammar); the worker only applies it to the logits
(apply_token_bitmask), so it loads no tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pagedserve.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:  # tensors only pass through (xgrammar does the work)
    import torch

# What each spec kind is called in an error message (the user's terms, not xgrammar's).
KIND_NAMES = {"json": "JSON schema", "json_object": "JSON object", "regex": "regular expression",
              "choice": "choice list", "grammar": "grammar"}


class GrammarError(ValueError):
    """A spec that does not compile; the message is fit for the client (no paths, no classes)."""


def spec_digest(spec: StructuredOutputsParams) -> str:
    """The cache key of a spec: sha256 of its canonical (kind, text)."""
    kind, text = spec.key
    return hashlib.sha256(f"{kind}\0{text}".encode()).hexdigest()


# xgrammar's C++ messages look like "[08:38:03] /project/cpp/regex_converter.cc:94: Regex parsing
# error ...": drop the log prefix, check-macro noise and the echoed input.
_LOG_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+?:\d+:\s*")
_CHECK_NOISE = re.compile(r"Check failed: \(.*?\) is (?:false|true):\s*")
_PATH = re.compile(r"(?:/[\w.+-]+)+\.(?:cc|cpp|h|hpp|py)(?::\d+)?:?\s*")


def clean_error(message: str) -> str:
    """An xgrammar error message without its source location, check macro or echoed input."""
    text = _LOG_PREFIX.sub("", message.strip().splitlines()[0] if message.strip() else "")
    text = _CHECK_NOISE.sub("", text)
    text = text.split(" The JSON string is:")[0]
    text = _PATH.sub("", text).strip()
    return text.rstrip(".") + "." if text else "it could not be compiled."


def compile_spec(compiler: Any, key: tuple[str, str]) -> Any:
    """xgrammar CompiledGrammar of a spec's (kind, text) key; GrammarError in the user's terms
    when it is invalid."""
    kind, text = key
    try:
        if kind == "json":
            return compiler.compile_json_schema(text)
        if kind == "json_object":  # OpenAI's json_object: any JSON object (not any value)
            return compiler.compile_json_schema('{"type": "object"}')
        if kind == "regex":
            return compiler.compile_regex(text)
        if kind == "choice":  # JSON string escaping is valid EBNF escaping; non-ASCII kept as UTF-8
            # (xgrammar reads a \uD83D\uDE42 surrogate pair as two code points, not one emoji)
            return compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(text)))
        return compiler.compile_grammar(text)
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError variously
        raise GrammarError(f"invalid structured output {kind}: the {KIND_NAMES[kind]} is invalid: "
                           f"{clean_error(str(e))}") from None


def tokenizer_info(tokenizer: Any, vocab_size: int) -> Any:
    import xgrammar as xgr

    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)


class GrammarCompilerCache:
    """The compiled grammars of one tokenizer and model vocabulary (logits width); thread-safe.

    Entries are keyed by spec digest. An entry that `is_pinned` (used by a live request of the
    engine: a preempted request rebuilds its matcher from it) is never evicted; the others form
    an LRU of at most `max_entries`. `num_compiles` counts real compiles (one per spec, tests).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, max_entries: int = 256, info: Any = None,
                 is_pinned: Callable[[str], bool] | None = None) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = info if info is not None else tokenizer_info(tokenizer, vocab_size)
        # xgrammar's own cache is off: ours is the one (bounded, pinned), no second copy
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.max_entries = max_entries
        self.num_compiles = 0
        self._is_pinned = is_pinned or (lambda digest: False)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> Any:
        with self._lock:
            compiled = self._compiled.get(digest)
            if compiled is not None:
                self._compiled.move_to_end(digest)
            return compiled

    def put(self, digest: str, compiled: Any) -> None:
        with self._lock:
            self._compiled[digest] = compiled
            self._compiled.move_to_end(digest)
        self.evict()

    def evict(self) -> None:
        """Drop the least recently used unpinned entries beyond max_entries."""
        with self._lock:
            unpinned = [d for d in self._compiled if not self._is_pinned(d)]
            for digest in unpinned[: max(0, len(unpinned) - self.max_entries)]:
                del self._compiled[digest]

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of `spec`, compiling it (in the caller's thread) when not cached."""
        digest = spec_digest(spec)
        compiled = self.get(digest)
        if compiled is None:
            compiled = compile_spec(self.compiler, spec.key)
            self.num_compiles += 1
            self.put(digest, compiled)
        return compiled

    def load(self, digest: str, serialized: str) -> Any:
        """Deserialize a grammar compiled elsewhere (for the same tokenizer) into the cache."""
        compiled = self.get(digest)
        if compiled is None:
            compiled = self._xgr.CompiledGrammar.deserialize_json(serialized, self.info)
            self.put(digest, compiled)
        return compiled

    def matcher(self, spec: StructuredOutputsParams, generated: Sequence[int] = ()) -> Any:
        """A fresh matcher for `spec` (which must be ready in the cache: the step loop never
        compiles) that has already accepted the `generated` tokens."""
        compiled = self.get(spec_digest(spec))
        if compiled is None:
            raise RuntimeError("structured output grammar used before it was ready")
        matcher = self._xgr.GrammarMatcher(compiled)
        for token in generated:
            if not matcher.accept_token(token):
                break  # cannot happen for tokens this matcher's masks allowed
        return matcher

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """[rows, ceil(vocab / 32)] int32, every token allowed."""
        return self._xgr.allocate_token_bitmask(rows, self.info.vocab_size)



def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of disallowed tokens to -inf in `rows` of logits [N, vocab], in place;
    bitmask [>= max(rows) + 1, ceil(vocab / 32)] int32 (row r masks logits row r). The worker's
    one use of xgrammar: no tokenizer, no grammar."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
