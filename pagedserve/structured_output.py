"""Structured outputs: grammars compiled with xgrammar and the per-request matchers that mask the
logits token by token (SamplingParams.structured_outputs).

    spec (json schema | json_object | regex | choice | EBNF)
      -> compiled grammar  (GrammarCompilerCache: one per tokenizer, cached by the spec's key)
      -> GrammarMatcher    (one per request, fed every sampled token; rebuilt after preemption
                            by replaying the tokens generated so far)
      -> token bitmask     ([N, ceil(vocab / 32)] int32, 1 bit per allowed token) applied to the
                            logits before sampling; the grammar's end admits the EOS token.

The front end compiles a request's spec once to reject a bad one with a clear error before it
reaches the engine; the engine compiles again in its own process (compiled grammars do not cross
process boundaries), from its cache.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import torch

from pagedserve.sampling_params import StructuredOutputsParams


def _choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of `choices` (JSON string escaping is valid EBNF escaping)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarCompilerCache:
    """Compiles specs for one tokenizer and model vocabulary (logits width); thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info)
        self._compiled: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of `spec`; ValueError naming the spec's kind when it is invalid."""
        key = spec.key
        with self._lock:
            compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        kind, text = key
        try:
            if kind == "json":
                compiled = self.compiler.compile_json_schema(text)
            elif kind == "json_object":  # OpenAI's json_object: any JSON object (not any value)
                compiled = self.compiler.compile_json_schema('{"type": "object"}')
            elif kind == "regex":
                compiled = self.compiler.compile_regex(text)
            elif kind == "choice":
                compiled = self.compiler.compile_grammar(_choice_grammar(json.loads(text)))
            else:
                compiled = self.compiler.compile_grammar(text)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError variously
            raise ValueError(f"invalid structured output {kind}: {e}") from None
        with self._lock:
            self._compiled[key] = compiled
        return compiled

    def matcher(self, spec: StructuredOutputsParams, generated: Sequence[int] = ()) -> Any:
        """A fresh matcher for `spec` that has already accepted the `generated` tokens."""
        matcher = self._xgr.GrammarMatcher(self.compile(spec))
        for token in generated:
            if not matcher.accept_token(token):
                break  # cannot happen for tokens this matcher's masks allowed
        return matcher

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """[rows, ceil(vocab / 32)] int32, every token allowed."""
        return self._xgr.allocate_token_bitmask(rows, self.info.vocab_size)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set the logits of disallowed tokens to -inf in `rows` of logits [N, vocab], in place."""
        self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                              indices=rows)
