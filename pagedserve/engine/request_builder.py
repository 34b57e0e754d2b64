"""From a user request to core requests, shared by LLMEngine (offline) and AsyncLLM (server):
prompt forms -> token ids, validation against the model, EOS ids, and the n-way fan-out.

A user request with n samples becomes n core requests "<i>_<id>" (just "<id>" when n == 1), each
with n = 1 and its own seed (seed + i). When the prompt has more than one token, the first child
leads: it computes the shared prompt and the others fork from it (core/request.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedserve.config import EngineConfig
from pagedserve.engine.messages import AddRequestMsg, ChildSpec
from pagedserve.inputs import PromptType, cache_salt_of
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.structured_output import GrammarCompilerCache


def load_tokenizer(config: EngineConfig) -> Any:
    from transformers import AutoTokenizer

    model_config = config.model_config
    from pagedserve.model_executor.gguf_loader import is_gguf

    if is_gguf(model_config.tokenizer):  # the tokenizer embedded in a GGUF checkpoint
        from pagedserve.model_executor.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(model_config.tokenizer, model_config.trust_remote_code)
    from pagedserve.tokenizers.qwen_tiktoken import QwenTiktokenTokenizer, is_qwen_tiktoken_dir

    if not model_config.trust_remote_code and is_qwen_tiktoken_dir(model_config.tokenizer):
        # Qwen v1 ships qwen.tiktoken + remote tokenizer code: our own loader, no checkpoint code
        return QwenTiktokenTokenizer.from_pretrained(model_config.tokenizer)
    hf_config = model_config.hf_config
    same_dir = model_config.tokenizer == model_config.model_dir
    if not model_config.trust_remote_code and same_dir:  # a family whose tokenizer is remote code
        from pagedserve.model_executor.family_tokenizers import load_family_tokenizer

        family = load_family_tokenizer(model_config.tokenizer, model_config.model_spec.model_type)
        if family is not None:
            return family
    own = _own_tokenizer(model_config.tokenizer, model_config.model_spec.model_type,
                         model_config.trust_remote_code)
    if own is not None:
        return own
    # The tokenizer of the checkpoint itself picks its class from the engine's one config object
    # (transformers would otherwise read config.json again); a separate tokenizer reads its own.
    extra = {"config": hf_config} if same_dir and hf_config is not None else {}
    return AutoTokenizer.from_pretrained(model_config.tokenizer, trust_remote_code=model_config.trust_remote_code,
                                         **extra)


def _own_tokenizer(tokenizer_dir: str, model_type: str, trust_remote_code: bool) -> Any:
    """Without trust_remote_code, a tokenizer that only checkpoint code could build (a
    tokenizer.model with a remote tokenizer class) is built by our loader; None otherwise."""
    from pagedserve.tokenizers.sentencepiece_tok import load_sentencepiece_tokenizer, needs_own_tokenizer

    if trust_remote_code or not os.path.isdir(tokenizer_dir) or not needs_own_tokenizer(tokenizer_dir):
        return None
    if model_type == "baichuan":
        from pagedserve.model_executor.models.baichuan import baichuan_tokenizer

        return baichuan_tokenizer(tokenizer_dir)
    if model_type == "chatglm":  # a --tokenizer directory apart from the model: GLM-4 or ChatGLM2/3
        from pagedserve.model_executor.family_tokenizers import load_family_tokenizer

        return load_family_tokenizer(tokenizer_dir, model_type)
    return load_sentencepiece_tokenizer(tokenizer_dir)


def generation_eos_ids(model_dir: str) -> list[int]:
    """EOS ids listed in generation_config.json (some models stop on several)."""
    import os

    from transformers import GenerationConfig

    if os.path.isfile(model_dir):  # a GGUF file: a generation_config.json may sit beside it
        model_dir = os.path.dirname(model_dir)
        if not os.path.isfile(os.path.join(model_dir, "generation_config.json")):
            return []
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return []
    eos = generation_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


@dataclass(slots=True)
class PreparedPrompt:
    """A prompt that passed the engine boundary: tokenized, truncated and checked once (the
    engine takes it as it is)."""

    text: str | None
    token_ids: list[int]
    cache_salt: str | None = None


class InvalidInputError(ValueError):
    """Input the model cannot take; `param` names the field at fault: "prompt" or a SamplingParams
    field (the server turns it into a 400 naming the request field it came from)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class RequestBuilder:
    tokenizer: Any
    max_model_len: int
    max_num_seqs: int
    max_logprobs: int
    vocab_size: int  # 0 until the engine reports it (the server learns it at start-up)
    eos_token_id: int | None
    extra_eos_ids: list[int] = field(default_factory=list)  # stop like stop_token_ids
    # the offline engine's grammar cache (EngineCore.grammars.cache): validate compiles into it,
    # so the engine finds the grammar ready; None on the server, which compiles in a worker
    # process instead (AsyncLLM.compile_grammar)
    grammars: Callable[[], GrammarCompilerCache] | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: EngineConfig, tokenizer: Any, vocab_size: int = 0) -> RequestBuilder:
        eos_ids = generation_eos_ids(config.model_config.model_dir)
        tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
        eos = tokenizer_eos if tokenizer_eos is not None else (eos_ids[0] if eos_ids else None)
        return cls(
            tokenizer=tokenizer,
            max_model_len=config.scheduler_config.max_model_len,
            max_num_seqs=config.scheduler_config.max_num_seqs,
            max_logprobs=config.model_config.max_logprobs,
            vocab_size=vocab_size,
            eos_token_id=eos,
            extra_eos_ids=[t for t in eos_ids if t != eos],
        )

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of any accepted prompt form."""
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, list):
            return None, list(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])  # type: ignore[typeddict-item]
            if "prompt" in prompt:
                return prompt["prompt"], list(self.tokenizer.encode(prompt["prompt"]))
        raise ValueError(
            "prompt must be a string, a list of token ids, or a dict with 'prompt' or "
            f"'prompt_token_ids', got {type(prompt).__name__}"
        )

    def prepare(self, prompt: PromptType, params: SamplingParams) -> PreparedPrompt:
        """The one validation of a request: tokenize, truncate (truncate_prompt_tokens), check the
        prompt and the params against the model, and (offline) compile its grammar into the
        engine's cache. InvalidInputError (a ValueError) names the field at fault."""
        prepared = self.prepare_prompt(prompt, params.truncate_prompt_tokens)
        self.prepare_params(params)
        return prepared

    def prepare_prompt(self, prompt: PromptType, truncate_prompt_tokens: int | None = None) -> PreparedPrompt:
        """The prompt half of `prepare` (the server runs it before the params exist: their default
        max_tokens depends on the prompt's length)."""
        text, token_ids = self.tokenize(prompt)
        cache_salt = cache_salt_of(prompt)
        if truncate_prompt_tokens is not None:
            token_ids = token_ids[-truncate_prompt_tokens:]
        self.check_prompt(token_ids)
        return PreparedPrompt(text, token_ids, cache_salt)

    def prepare_params(self, params: SamplingParams) -> None:
        """The params half of `prepare`: the model's bounds, then the grammar (offline only)."""
        self.check_params(params)
        if params.structured_outputs is not None and self.grammars is not None:
            self.grammars().compile(params.structured_outputs)  # GrammarError: the caller's error

    def check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidInputError("prompt", "the prompt is empty: give at least one token")
        if len(token_ids) > self.max_model_len:
            raise InvalidInputError(
                "prompt", f"the prompt ({len(token_ids)} tokens) is longer than max_model_len "
                f"({self.max_model_len}): this model's maximum context length is {self.max_model_len} "
                "tokens. Please shorten the prompt.",
            )
        bad = [t for t in token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise InvalidInputError("prompt", f"prompt token ids must be in [0, {self.vocab_size - 1}], got {bad[:5]}")

    def check_params(self, params: SamplingParams) -> None:
        """The bounds that depend on the model, one field at a time so that the error names it
        (SamplingParams.verify_for_model is the same rule for callers without a builder)."""
        if params.n > self.max_num_seqs:
            raise InvalidInputError("n", f"n ({params.n}) must not exceed max_num_seqs ({self.max_num_seqs})")
        top = self.vocab_size - 1
        bad = sorted(t for t in params.all_stop_token_ids if not 0 <= t <= top)
        if bad:
            raise InvalidInputError("stop_token_ids", f"stop_token_ids must be in [0, {top}] (the vocabulary), got {bad[:5]}.")
        bad = sorted(t for t in params.logit_bias or {} if not 0 <= t <= top)
        if bad:
            raise InvalidInputError("logit_bias", f"logit_bias token ids must be in [0, {top}] (the vocabulary), got {bad[:5]}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.max_logprobs:
                raise InvalidInputError(name, f"{name} must be in [0, max_logprobs={self.max_logprobs}], got {value}.")

    def fan_out(
        self, request_id: str, prepared: PreparedPrompt, params: SamplingParams, arrival_time: float,
        priority: int = 0, priority_class: str = "interactive", grammar: str | None = None,
    ) -> AddRequestMsg:  # fmt: skip
        """The one message of a user request with its n children (child_params), for any engine
        driver: the engine side turns it into linked core requests (messages.requests_from_msg)."""
        return AddRequestMsg(
            children=[ChildSpec(cid, p) for cid, p in self.child_params(request_id, params)],
            prompt_token_ids=prepared.token_ids, eos_token_id=self.eos_token_id, arrival_time=arrival_time,
            priority=priority, priority_class=priority_class, grammar=grammar, cache_salt=prepared.cache_salt,
        )  # fmt: skip

    def child_params(self, request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
        """(child id, params) of the n core requests; the model's extra EOS ids stop them like
        stop_token_ids (unless ignore_eos)."""
        ids = [request_id] if params.n == 1 else [f"{i}_{request_id}" for i in range(params.n)]
        out: list[tuple[str, SamplingParams]] = []
        for index, child_id in enumerate(ids):
            p = params.child(index) if params.n > 1 else params.clone()
            if not p.ignore_eos and self.extra_eos_ids:
                p.stop_token_ids = list(p.all_stop_token_ids | set(self.extra_eos_ids))
            out.append((child_id, p))
        return out
