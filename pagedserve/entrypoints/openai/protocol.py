"""Pydantic models of the OpenAI API requests, as vLLM accepts them (responses: responses.py).

Requests accept the OpenAI fields plus vLLM's sampling extras (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, ...). Unknown fields are ignored with a warning, as vLLM
does. Every bound is checked here so that a bad value is a 400 naming the field (see errors.py);
`to_sampling_params()` then yields keyword arguments that `SamplingParams` accepts.

Numbers are read strictly: an integer field takes a JSON integer (or a float with no fractional
part, 2.0, which vLLM accepts too), never a boolean or a string; a float field takes any JSON
number, never a boolean or a string. Every integer has an upper bound (token ids and counts fit an
int32, priority an int64), so that no value overflows when the request crosses to the engine
process (msgspec) or into a tensor. Text anywhere in a request must be valid Unicode: a lone UTF-16
surrogate (JSON "\\ud800") is a 400 naming the field, since nothing can encode it as UTF-8.

Field presence rule of `to_sampling_params`: a knob the request leaves unset (None) is taken from
`default_sampling_params` (the model's generation_config, as vLLM) or, failing that, omitted, so
that SamplingParams' own default applies.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator, model_validator

from pagedserve.entrypoints.openai.errors import BadRequestError, ParamError
from pagedserve.sampling_params import (
    RequestOutputKind,
    SamplingParams,
    SamplingParamsError,
    StructuredOutputsParams,
)

logger = logging.getLogger(__name__)

# SamplingParams' seed range: torch.Generator takes a signed or unsigned 64-bit seed.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
# Token ids and counts are int32 in the engine's tensors; priority is an int64 in the IPC message.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# JSON has no -inf; OpenAI-compatible servers send this floor instead (as vLLM).
LOGPROB_FLOOR = -9999.0
# A logit_bias key: a token id in ASCII digits (str.isdigit also takes "٣", Arabic-Indic 3).
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _integral_to_int(value: Any) -> Any:
    """2.0 -> 2 (as vLLM's lax parsing); 2.5, true, "2" are left for the strict check to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Strict: a bool is not an int and a string is not a number (pydantic's lax mode takes both).
StrictInt = Annotated[int, Strict(), BeforeValidator(_integral_to_int)]
StrictFloat = Annotated[float, Strict()]
Count = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
PositiveCount = Annotated[StrictInt, Field(ge=1, le=INT32_MAX)]
Penalty = Annotated[StrictFloat, Field(ge=-2.0, le=2.0)]
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def clamp_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


def lone_surrogate_path(data: Any) -> str | None:
    """The field path ("messages.[0].content", as errors.py spells it; "body" for the body itself)
    of the first string, value or key, of a parsed JSON body that holds a lone UTF-16 surrogate,
    or None. Iterative, so that a deeply nested body cannot exhaust the stack."""
    stack: list[tuple[Any, str]] = [(data, "body")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
                key_path = name if path == "body" else f"{path}.{name}"
                if isinstance(key, str) and _SURROGATE.search(key):
                    return key_path
                stack.append((item, key_path))
        elif isinstance(value, list):
            for i in reversed(range(len(value))):
                stack.append((value[i], f"[{i}]" if path == "body" else f"{path}.[{i}]"))
    return None


class _RequestModel(OpenAIBaseModel):
    @model_validator(mode="before")
    @classmethod
    def _check_body(cls, data: Any) -> Any:
        # Lone surrogates first: they cannot even be logged or echoed in an error as UTF-8.
        where = lone_surrogate_path(data)
        if where is not None:
            raise ParamError(where, f"'{where}' is not valid Unicode text: it holds a lone UTF-16 surrogate "
                                    "(an unpaired \\uD800-\\uDFFF escape).")
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                logger.warning("%s: ignoring unknown fields %s", cls.__name__, sorted(map(str, unknown))[:20])
        return data


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False  # vLLM extra: usage on every chunk


class ResponseFormat(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ParamError(
                "response_format.json_schema", "response_format type 'json_schema' needs a json_schema."
            )
        return self


class _SamplingRequest(_RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, StrictFloat] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] = 1
    seed: StrictInt | None = None  # in [_SEED_MIN, _SEED_MAX]: checked by _check_seed
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    user: str | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    # vLLM extras
    top_k: Annotated[StrictInt, Field(ge=-1, le=INT32_MAX)] | None = None  # >= vocab: all tokens
    min_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[StrictFloat, Field(gt=0.0)] | None = None
    ignore_eos: bool = False
    min_tokens: Count = 0
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: PositiveCount | None = None
    prompt_logprobs: Count | None = None
    priority: Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)] = 0
    # pagedserve: "batch" waits behind "interactive" work (a tenant's class wins; see slo_admission.py)
    priority_class: Literal["interactive", "batch"] | None = None
    return_token_ids: bool | None = None  # vLLM extra: prompt/generated token ids in the response
    request_id: Annotated[str, Field(max_length=256)] | None = None
    # vLLM's cache_salt (only requests with the same salt share cached prefixes); the server puts
    # the tenant's own salt in front of it (ops/tenants.py), so it never reaches another tenant's
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # pagedserve extra: replace personal identifiers by placeholders before tokenization
    # ("reversible": and restore them in the response); ops/deid
    deidentify: Literal["mask", "reversible"] | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return [v] if v else None
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        if any(s == "" for s in v):
            raise ValueError("stop must not contain empty strings")
        return v

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, v: int | None) -> int | None:
        # By hand: pydantic prints a bound past int64 as a float (2**64 - 1 as ...552000).
        if v is not None and not _SEED_MIN <= v <= _SEED_MAX:
            raise ValueError(f"seed must be an integer greater than or equal to {_SEED_MIN} and less than or "
                             f"equal to {_SEED_MAX}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not _TOKEN_ID_KEY.fullmatch(key) or int(key) > INT32_MAX:
                raise ValueError(
                    f"logit_bias keys must be token ids (non-negative integers in ASCII digits), got {key!r}"
                )
        return v

    @property
    def is_streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Whether every streamed chunk carries the usage so far (vLLM's
        stream_options.continuous_usage_stats, which needs include_usage)."""
        return bool(self.include_usage and self.stream_options and self.stream_options.continuous_usage_stats)

    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def _logprob_params(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) in SamplingParams' meaning."""
        raise NotImplementedError

    def param_for(self, field_name: str) -> str:
        """The request field a SamplingParams field came from (for a 400's `param`)."""
        return field_name

    @model_validator(mode="after")
    def _check_shared(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options can only be set when stream=true.")
        if self.prompt_logprobs is not None and self.stream:
            raise ParamError("prompt_logprobs", "prompt_logprobs is not available when stream=true.")
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError(
                "best_of", f"best_of must be equal to n={self.n} (best_of > n is not supported)."
            )
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise ParamError(
                "min_tokens", f"min_tokens must be in [0, max_tokens={max_tokens}], got {self.min_tokens}."
            )
        return self

    def sampling_params(
        self, default_max_tokens: int, default_sampling_params: Mapping[str, Any] | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> SamplingParams:  # fmt: skip
        """The request as SamplingParams (to_sampling_params' fields); a value SamplingParams
        refuses is a 400 naming the request field it came from (min_tokens <= max_tokens is
        its rule, checked there once)."""
        kwargs = self.to_sampling_params(default_max_tokens, default_sampling_params)
        try:
            return SamplingParams(**kwargs, output_kind=output_kind)
        except SamplingParamsError as e:
            raise BadRequestError(str(e), param=self.param_for(e.param)) from None
        except ValueError as e:
            raise BadRequestError(str(e)) from None

    def to_sampling_params(
        self, default_max_tokens: int, default_sampling_params: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for `pagedserve.sampling_params.SamplingParams`.

        default_max_tokens: used when the request sets no max_tokens (the server passes what still
        fits in the context). default_sampling_params: the model's generation defaults (keys are
        SamplingParams field names), used for the knobs the request leaves unset.
        """
        if default_max_tokens < 1:
            raise BadRequestError(
                f"The prompt leaves no room to generate (default_max_tokens={default_max_tokens}).",
                param="max_tokens",
            )
        defaults = dict(default_sampling_params or {})
        max_tokens = self.requested_max_tokens()
        if max_tokens is None:
            max_tokens = min(int(defaults.get("max_tokens", default_max_tokens)), default_max_tokens)
        # min_tokens <= max_tokens: SamplingParams' rule (its error names the field)
        out: dict[str, Any] = {
            "n": self.n,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "stop": list(self.stop or []),
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
        }
        logprobs, prompt_logprobs = self._logprob_params()
        optional: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "truncate_prompt_tokens": self.truncate_prompt_tokens,
            "best_of": self.best_of,
            "logit_bias": {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
        }
        for name, value in optional.items():
            if value is not None:
                out[name] = value
            elif name in defaults and defaults[name] is not None:
                out[name] = defaults[name]
        structured = self._structured_outputs()
        if structured is not None:
            out["structured_outputs"] = structured
        return out

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """One spec from response_format, structured_outputs or the guided_* fields (a 400 when
        they name more than one constraint). Whether a schema/regex/grammar compiles is checked
        by its one compile (structured_limits.compile_request_grammar; offline RequestBuilder.prepare)."""
        given: dict[str, Any] = dict(self.structured_outputs or {})
        for field_name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                                ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            value = getattr(self, field_name)
            if value is not None:
                given[key] = value
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given["json_object"] = True
        elif fmt is not None and fmt.type == "json_schema":
            assert fmt.json_schema is not None  # checked by ResponseFormat
            schema = fmt.json_schema.get("schema")
            if not isinstance(schema, dict):
                raise BadRequestError("response_format.json_schema needs a 'schema' object.",
                                      param="response_format.json_schema.schema")
            given["json"] = schema
        if not given:
            return None
        unknown = sorted(set(given) - {"json", "regex", "choice", "grammar", "json_object"})
        if unknown:
            raise BadRequestError(f"unknown structured_outputs field(s): {', '.join(unknown)}.",
                                  param="structured_outputs")
        try:
            return StructuredOutputsParams(**given)
        except ValueError as e:
            raise BadRequestError(str(e), param=self.structured_outputs_param()) from None

    def structured_outputs_param(self) -> str:
        """The request field a structured-output error names: the one the spec came from."""
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            if getattr(self, name) is not None:
                return name
        keys = sorted(self.structured_outputs or {})
        return f"structured_outputs.{keys[0]}" if len(keys) == 1 else "structured_outputs"


# ---------------------------------------------------------------------------- /v1/completions


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 only with echo: a scoring request (the prompt's logprobs, nothing generated)
    max_tokens: Count | None = 16
    echo: bool | None = False
    logprobs: Count | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        # One clear message per shape error instead of pydantic's four union-branch errors.
        shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError(f"prompt must be {shapes}")
        if not v:
            raise ValueError("prompt must not be empty")
        if all(isinstance(p, str) for p in v):
            return v
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            if any(t < 0 for t in v):
                raise ValueError("prompt token ids must be >= 0")
            return v
        if all(isinstance(p, list) for p in v):
            for p in v:
                if not p:
                    raise ValueError("prompt token-id lists must not be empty")
                if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
                    raise ValueError("prompt token ids must be integers >= 0")
            return v
        raise ValueError(f"prompt must be {shapes} (not a mix)")

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ParamError("suffix", "suffix is not supported.")
        if self.max_tokens == 0 and not self.echo:
            raise ParamError("max_tokens", "max_tokens must be greater than or equal to 1 (0 is accepted "
                                           "only with echo=true: a request that scores the prompt).")
        return self

    @property
    def is_scoring(self) -> bool:
        """echo + max_tokens 0, the legacy OpenAI scoring call: the answer is the prompt itself,
        with its token logprobs when `logprobs` is set; nothing is generated."""
        return bool(self.echo) and self.max_tokens == 0

    def param_for(self, field_name: str) -> str:
        if field_name == "prompt_logprobs" and self.prompt_logprobs is None:
            return "logprobs"  # echo + logprobs asked for them
        return super().param_for(field_name)

    def to_sampling_params(
        self, default_max_tokens: int, default_sampling_params: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        out = super().to_sampling_params(default_max_tokens, default_sampling_params)
        if self.is_scoring:
            # The engine always samples: a scoring request generates one token that the server
            # drops (as vLLM does), so it costs one prefill. Greedy, with no sample logprobs and no
            # grammar, since nothing about that token reaches the client.
            out.update(max_tokens=1, min_tokens=0, temperature=0.0)
            out.pop("logprobs", None)
            out.pop("structured_outputs", None)
        return out

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [[int(t) for t in p]]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprob_params(self) -> tuple[int | None, int | None]:
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            # echo + logprobs: the prompt's logprobs come back too, with `logprobs` top entries
            prompt_logprobs = max(prompt_logprobs or 0, self.logprobs)
        return self.logprobs, prompt_logprobs


# ---------------------------------------------------------------------------- /v1/chat/completions


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessageParam(OpenAIBaseModel):
    """One input message. Extra keys are kept: chat templates may read them."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("content must be a string or a list of {'type': 'text', 'text': ...} parts")
        for i, part in enumerate(v):
            if not isinstance(part, dict):
                raise ValueError(f"content part {i} must be an object {{'type': 'text', 'text': ...}}")
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"content part {i} has type {kind!r}; only 'text' parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} needs a string 'text'")
        return v

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM's "string" format)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class FunctionDefinition(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatTool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: dict[str, str]  # {"name": ...}


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)]
    max_tokens: PositiveCount | None = None  # deprecated by OpenAI, still honoured
    max_completion_tokens: PositiveCount | None = None
    logprobs: bool | None = False
    top_logprobs: Count | None = 0
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM extras
    echo: bool = False  # prepend the last message's content when it has the reply's role
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs requires logprobs=true.")
        if self.continue_final_message and self.add_generation_prompt:
            raise ParamError(
                "continue_final_message",
                "continue_final_message and add_generation_prompt cannot both be true.",
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ParamError(
                "messages", "continue_final_message needs the last message to be from the assistant."
            )
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ParamError("tool_choice", "tool_choice 'required' or a named function needs tools.")
        if isinstance(self.tool_choice, NamedToolChoice):
            wanted = self.tool_choice.function.get("name")
            if wanted not in {t.function.name for t in self.tools or []}:
                raise ParamError(
                    "tool_choice", f"tool_choice names function {wanted!r}, which is not in tools."
                )
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprob_params(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, self.prompt_logprobs

    def param_for(self, field_name: str) -> str:
        return {"logprobs": "top_logprobs", "prompt": "messages"}.get(field_name, field_name)

    @property
    def forced_tool(self) -> ChatTool | None:
        """The tool a named tool_choice forces (its call's arguments are the whole reply)."""
        if not isinstance(self.tool_choice, NamedToolChoice):
            return None
        name = self.tool_choice.function.get("name")
        return next(t for t in self.tools or [] if t.function.name == name)

    @property
    def tools_required(self) -> bool:
        return self.tool_choice == "required"

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """A named tool_choice constrains the reply to the function's parameters schema;
        "required" to a JSON array of {"name", "parameters"} calls of the given tools (as vLLM)."""
        forced, required = self.forced_tool, self.tools_required
        if forced is None and not required:
            return super()._structured_outputs()
        if super()._structured_outputs() is not None:
            raise BadRequestError("tool_choice 'required' or a named function cannot be combined with "
                                  "response_format or other structured outputs.", param="tool_choice")
        if forced is not None:
            return StructuredOutputsParams(json=forced.function.parameters or {"type": "object"})
        calls = [{"type": "object", "properties": {
                      "name": {"type": "string", "enum": [t.function.name]},
                      "parameters": t.function.parameters or {"type": "object"}},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for t in self.tools or []]
        return StructuredOutputsParams(json={"type": "array", "minItems": 1, "items": {"anyOf": calls}})

    def structured_outputs_param(self) -> str:
        """A forced tool call's constraint comes from the tools' parameter schemas."""
        if self.forced_tool is not None or self.tools_required:
            return "tools"
        return super().structured_outputs_param()

    def messages_for_template(self, content_format: str = "string") -> list[dict[str, Any]]:
        """Messages as plain dicts ready for tokenizer.apply_chat_template: content as one string
        ("string"), or as a list of {"type": "text", "text": ...} parts ("openai", for templates
        that loop over content; no content is "" either way)."""
        out: list[dict[str, Any]] = []
        for m in self.messages:
            d = m.model_dump(exclude_none=True, exclude={"content"})
            if content_format == "openai" and m.content is not None:
                parts = [TextContentPart(text=m.content)] if isinstance(m.content, str) else m.content
                d["content"] = [p.model_dump() for p in parts]
            else:
                d["content"] = m.text()
            out.append(d)
        return out

    def tools_for_template(self) -> list[dict[str, Any]] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


# ---------------------------------------------------------------------------- models, tokenize, errors


class TokenizeCompletionRequest(_RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_RequestModel):
    model: str | None = None
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None

    @model_validator(mode="after")
    def _check(self) -> TokenizeChatRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ParamError(
                "continue_final_message",
                "continue_final_message and add_generation_prompt cannot both be true.",
            )
        return self


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(_RequestModel):
    model: str | None = None
    tokens: list[TokenId]
