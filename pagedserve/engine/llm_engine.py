"""LLMEngine: vLLM's synchronous engine API (add_request / step / abort_request).

    engine = LLMEngine.from_engine_args(EngineArgs(model=...))
    while True:
        for request_id, prompt, params in get_new_requests():
            engine.add_request(request_id, prompt, params)
        for output in engine.step():
            ...

A user request with n samples becomes n core requests "0_<id>" ... "<n-1>_<id>": the first is the
leader that computes the prompt, the others fork from it (see core/request.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from pagedserve.config import EngineArgs, EngineConfig
from pagedserve.core.request import Request
from pagedserve.engine.engine_core import EngineCore, EngineStats
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.inputs import PromptType
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams


def load_tokenizer(config: EngineConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        config.model_config.tokenizer, trust_remote_code=False
    )


def generation_eos_ids(model_dir: str) -> list[int]:
    """EOS ids listed in generation_config.json (some models stop on several)."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return []
    eos = generation_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model_config
        self.tokenizer = load_tokenizer(config)
        self.engine_core = EngineCore(config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.vocab_size = self.engine_core.runner.vocab_size
        eos_ids = generation_eos_ids(self.model_config.model_dir)
        tokenizer_eos = self.tokenizer.eos_token_id
        self.eos_token_id: int | None = tokenizer_eos if tokenizer_eos is not None else (
            eos_ids[0] if eos_ids else None
        )
        # Extra EOS ids from generation_config stop like stop_token_ids (unless ignore_eos).
        self.extra_eos_ids = [t for t in eos_ids if t != self.eos_token_id]

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ---------------------------------------------------------------- requests

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of any accepted prompt form."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list):
            return None, list(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])  # type: ignore[typeddict-item]
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(
            "prompt must be a string, a list of token ids, or a dict with 'prompt' or "
            f"'prompt_token_ids', got {type(prompt).__name__}"
        )

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        max_len = self.config.scheduler_config.max_model_len
        if len(token_ids) > max_len:
            raise ValueError(
                f"the prompt ({len(token_ids)} tokens) is longer than max_model_len ({max_len})"
            )
        bad = [t for t in token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size - 1}], got {bad[:5]}")

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        if params.n > self.config.scheduler_config.max_num_seqs:
            raise ValueError(
                f"n ({params.n}) must not exceed max_num_seqs ({self.config.scheduler_config.max_num_seqs})"
            )
        params.verify_for_model(self.vocab_size, self.model_config.max_logprobs)
        text, token_ids = self.tokenize_prompt(prompt)
        self._validate_prompt(token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time

        child_ids = [request_id] if params.n == 1 else [f"{i}_{request_id}" for i in range(params.n)]
        children = []
        for index, child_id in enumerate(child_ids):
            child_params = params.child(index) if params.n > 1 else params.clone()
            if not child_params.ignore_eos and self.extra_eos_ids:
                child_params.stop_token_ids = list(child_params.all_stop_token_ids | set(self.extra_eos_ids))
            children.append(
                Request(
                    request_id=child_id,
                    prompt_token_ids=token_ids,
                    sampling_params=child_params,
                    eos_token_id=self.eos_token_id,
                    arrival_time=arrival,
                    priority=priority,
                )
            )
        self.output_processor.add_request(request_id, text, token_ids, params, child_ids, arrival)
        if len(token_ids) > 1:  # the leader computes the shared prompt, the others fork
            children[0].followers = children[1:]
            self.engine_core.add_request(children[0])
        else:  # a one-token prompt has nothing to share
            for child in children:
                self.engine_core.add_request(child)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        child_ids = self.output_processor.abort_requests(ids)
        self.engine_core.abort_requests(child_ids)

    def step(self) -> list[RequestOutput]:
        core_outputs = self.engine_core.step()
        processed = self.output_processor.process_outputs(core_outputs)
        if processed.reqs_to_abort:  # finished by a stop string
            self.engine_core.abort_requests(processed.reqs_to_abort)
        return processed.request_outputs

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()

    def get_stats(self) -> EngineStats:
        return self.engine_core.stats
