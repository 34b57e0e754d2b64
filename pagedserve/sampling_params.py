"""SamplingParams: how one request samples and when it stops (vLLM-compatible fields and defaults).

Pure Python (no torch): `core/` imports it and it crosses the engine-core IPC boundary.

Normalisation done on construction (so every later reader sees one canonical form):
  * `stop` -> list[str], `stop_token_ids` -> list[int] (duplicates dropped, order kept);
  * `top_k`: -1 ("off" in older vLLM) is normalised to 0; 0 means "consider all tokens";
  * `seed == -1` -> None (as vLLM); `logprobs=True` / `prompt_logprobs=True` -> 1;
  * `logit_bias` keys -> int, values clamped to [-100, 100] (the OpenAI rule);
  * greedy (temperature < 1e-5): top_p, top_k, min_p are reset to neutral; n > 1 is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import json as _json
import math
from dataclasses import dataclass

# Temperatures below this are greedy sampling (argmax), as in vLLM.
SAMPLING_EPS = 1e-5
# Seeds are handed to torch.Generator.manual_seed, which takes a signed or unsigned 64-bit int.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1
_LOGIT_BIAS_LIMIT = 100.0


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries everything generated so far
    DELTA = 1  # every output carries only what is new since the previous one
    FINAL_ONLY = 2  # a single output, once the request is finished


class SamplingParamsError(ValueError):
    """A SamplingParams value out of its bounds; `param` names the field (the server's 400 names
    the request field it came from)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type[SamplingParamsError], tuple[str, str]]:  # picklable
        return SamplingParamsError, (self.param, str(self))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_number(name: str, value: object) -> float:
    if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise SamplingParamsError(name.split("[")[0], f"{name} must be a finite number, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


@dataclass(slots=True)
class StructuredOutputsParams:
    """Constrain the generated text (vLLM's StructuredOutputsParams): exactly one of a JSON schema,
    any JSON object, a regular expression, one of a list of strings, or an EBNF grammar. Enforced
    token by token with xgrammar (see structured_output.py)."""

    json: str | dict | None = None  # a JSON schema (dict, or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF style: root ::= ...)
    json_object: bool | None = None  # any JSON object

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one of json, regex, choice, grammar or "
                             f"json_object, got {given or 'none'}.")
        if isinstance(self.json, dict):
            self.json = _json.dumps(self.json, sort_keys=True)
        if self.json is not None and not isinstance(self.json, str):
            raise ValueError(f"structured outputs: json must be a schema object or its JSON text, got {self.json!r}.")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or any(not isinstance(c, str) for c in self.choice)):
            raise ValueError(f"structured outputs: choice must be a non-empty list of strings, got {self.choice!r}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured outputs: {name} must be a non-empty string.")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): what a compiled grammar is cached under."""
        if self.json is not None:
            return "json", str(self.json)
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", _json.dumps(self.choice)
        assert self.grammar is not None
        return "grammar", self.grammar

    @classmethod
    def from_dict(cls, d: dict) -> StructuredOutputsParams:
        return cls(**{k: v for k, v in d.items() if k in ("json", "regex", "choice", "grammar", "json_object")})


@dataclass(slots=True)
class SamplingParams:
    """Sampling and stopping parameters for one request (see vLLM's SamplingParams)."""

    n: int = 1
    best_of: int | None = None  # accepted only as None or == n (no beam-style best-of)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (-1 accepted and normalised to 0)
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: until the context limit
    min_tokens: int = 0
    logprobs: int | None = None  # top-k sample logprobs per token (the sampled token is always added)
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self._verify()
        if self.temperature < SAMPLING_EPS:
            # Greedy: the truncation knobs cannot change an argmax; reset them so the sampler
            # never does work for them.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            # vLLM rejects n > 1 with greedy; we accept it: n identical completions, as the
            # OpenAI API gives (and a cheap way to exercise n > 1 deterministically).

    # ------------------------------------------------------------------ construction helpers

    def _normalise(self) -> None:
        if self.seed == -1:
            self.seed = None
        if self.top_k == -1:
            self.top_k = 0
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if self.logit_bias is not None:
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                try:
                    token_id = int(key)
                except (TypeError, ValueError):
                    raise SamplingParamsError("logit_bias", f"logit_bias keys must be integer token ids, got {key!r}.") from None
                v = _check_number(f"logit_bias[{key!r}]", value)
                bias[token_id] = min(_LOGIT_BIAS_LIMIT, max(-_LOGIT_BIAS_LIMIT, v))
            self.logit_bias = bias or None
        if isinstance(self.structured_outputs, dict):  # vLLM-style: a dict of its fields
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)

    def _verify(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise SamplingParamsError("n", f"n must be an integer >= 1, got {self.n!r}.")
        if self.best_of is not None and self.best_of != self.n:
            raise SamplingParamsError("best_of", f"best_of must be None or equal to n={self.n}, got {self.best_of!r}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_number(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise SamplingParamsError(name, f"{name} must be in [-2, 2], got {value}.")
        if _check_number("repetition_penalty", self.repetition_penalty) <= 0.0:
            raise SamplingParamsError("repetition_penalty", f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if _check_number("temperature", self.temperature) < 0.0:
            raise SamplingParamsError("temperature", f"temperature must be non-negative (>= 0), got {self.temperature}.")
        if not 0.0 < _check_number("top_p", self.top_p) <= 1.0:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingParamsError("top_k", f"top_k must be 0 or -1 (disabled), or an integer >= 1, got {self.top_k!r}.")
        if not 0.0 <= _check_number("min_p", self.min_p) <= 1.0:
            raise SamplingParamsError("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            raise SamplingParamsError("seed", f"seed must be None or an integer in [-2**63, 2**64 - 1], got {self.seed!r}.")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise SamplingParamsError("max_tokens", f"max_tokens must be None or an integer >= 1, got {self.max_tokens!r}.")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise SamplingParamsError("min_tokens", f"min_tokens must be an integer >= 0, got {self.min_tokens!r}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}."
            )
        for name in ("logprobs", "prompt_logprobs", "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise SamplingParamsError(name, f"{name} must be None or an integer >= 0, got {value!r}.")
        if self.truncate_prompt_tokens == 0:
            raise SamplingParamsError("truncate_prompt_tokens", "truncate_prompt_tokens must be None or an integer >= 1, got 0.")
        assert isinstance(self.stop, list) and isinstance(self.stop_token_ids, list)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamsError("stop", f"stop must contain only non-empty strings, got {self.stop!r}.")
        if self.stop and not self.detokenize:
            raise SamplingParamsError("stop", "stop strings need detokenize=True; set detokenize=True to use stop.")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", f"stop_token_ids must contain only integers >= 0, got {self.stop_token_ids!r}.")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise SamplingParamsError("structured_outputs", "structured_outputs must be a StructuredOutputsParams or a dict of its fields.")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise SamplingParamsError("output_kind", f"output_kind must be a RequestOutputKind, got {self.output_kind!r}.")

    # ------------------------------------------------------------------ derived views

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> frozenset[int]:
        """The stop token ids given by the user (EOS is NOT included).

        The model's EOS id travels separately (`Request.eos_token_id` / `NewRequestData`): it stops
        a request unless `ignore_eos`, while `stop_token_ids` always stop it. Both are masked out
        by the sampler while fewer than `min_tokens` tokens were generated (as vLLM).
        """
        assert isinstance(self.stop_token_ids, list)
        return frozenset(self.stop_token_ids)

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list (it always is one after construction; this view is typed)."""
        assert isinstance(self.stop, list)
        return self.stop

    @property
    def output_text_buffer_length(self) -> int:
        """Characters a stream must hold back: the longest stop string could still be forming."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop_strings) - 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def verify_for_model(self, vocab_size: int, max_logprobs: int | None = None) -> None:
        """Checks that need the model: token ids inside [0, vocab_size), logprobs <= max_logprobs.

        The engine calls this when a request arrives, so bad input fails there and not mid-step.
        """
        bad = [t for t in self.all_stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise SamplingParamsError(
                "stop_token_ids", f"stop_token_ids must be in [0, {vocab_size - 1}] (the vocabulary), got {sorted(bad)}."
            )
        bad = [t for t in (self.logit_bias or {}) if not 0 <= t < vocab_size]
        if bad:
            raise SamplingParamsError(
                "logit_bias", f"logit_bias token ids must be in [0, {vocab_size - 1}] (the vocabulary), got {sorted(bad)}."
            )
        if max_logprobs is not None:
            for name in ("logprobs", "prompt_logprobs"):
                value = getattr(self, name)
                if value is not None and value > max_logprobs:
                    raise SamplingParamsError(name, f"{name} must be in [0, max_logprobs={max_logprobs}], got {value}.")

    def clone(self) -> SamplingParams:
        """A copy that shares no mutable container with this one (cheap: no validation re-run)."""
        new = object.__new__(SamplingParams)
        for f in dataclasses.fields(SamplingParams):
            setattr(new, f.name, getattr(self, f.name))
        new.stop = list(self.stop_strings)
        new.stop_token_ids = list(self.stop_token_ids or [])
        new.logit_bias = dict(self.logit_bias) if self.logit_bias is not None else None
        return new

    def child(self, index: int) -> SamplingParams:
        """Params of child `index` of an n > 1 request: n=1, and seed + index when seeded (as vLLM),
        so that every child draws its own reproducible stream."""
        new = self.clone()
        new.n = 1
        new.best_of = None
        if self.seed is not None:
            seed = self.seed + index
            new.seed = seed - 2**64 if seed > _SEED_MAX else seed  # wrap, as a uint64 would
        return new

    def __repr__(self) -> str:
        # Only the fields that differ from the defaults: keeps logs readable.
        parts = []
        for f in dataclasses.fields(SamplingParams):
            value = getattr(self, f.name)
            default = f.default
            if f.name == "stop" and value == []:
                continue
            if f.name == "stop_token_ids" and value == []:
                continue
            if value != default:
                parts.append(f"{f.name}={value!r}")
        return f"SamplingParams({', '.join(parts)})"
