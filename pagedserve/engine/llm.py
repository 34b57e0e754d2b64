"""LLM: vLLM's offline class. generate() and chat() run the engine until every request is done."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedserve.config import EngineArgs
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.inputs import PromptType
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        block_size: int = 16,
        swap_space: float = 4,
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int | None = None,  # None: from the device (batch_defaults.py)
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        **kwargs: Any,
    ) -> None:
        if not model:  # the built-in model: SmolLM2-135M-Instruct, else the demo (builtin_model.py)
            from pagedserve.builtin_model import builtin_model

            builtin = builtin_model()
            model = builtin.model
            kwargs.setdefault("served_model_name", builtin.served_model_name)
            kwargs["override_generation_config"] = {**builtin.generation_defaults,
                                                    **(kwargs.get("override_generation_config") or {})}
        engine_args = EngineArgs.from_kwargs(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            seed=seed,
            block_size=block_size,
            swap_space=swap_space,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            **kwargs,
        )
        self.llm_engine = LLMEngine.from_engine_args(engine_args)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config defaults (as vLLM); what generate()
        and chat() use when given no sampling_params."""
        defaults = self.llm_engine.model_config.generation_defaults
        return SamplingParams(**defaults) if defaults else SamplingParams()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts."""
        if prompts is None:
            if prompt_token_ids is None:
                raise ValueError("give prompts or prompt_token_ids")
            prompt_list: list[PromptType] = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        elif isinstance(prompts, (str, dict)) or _is_token_list(prompts):
            prompt_list = [prompts]  # type: ignore[list-item]
        else:
            prompt_list = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            params_list = [self.get_default_sampling_params()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts"
                )
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"got {len(priority)} priorities for {len(prompt_list)} prompts")

        request_ids: list[str] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
                final_only = params.clone()
                final_only.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = str(next(self._counter))
                self.llm_engine.add_request(
                    request_id, prompt, final_only, priority=priority[i] if priority else 0
                )
                request_ids.append(request_id)
        except Exception:
            self.llm_engine.abort_request(request_ids)  # all or nothing: drop what was added
            raise
        return self._run_engine(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the tokenizer's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = []
        for conversation in conversations:
            if not conversation:
                raise ValueError("messages must not be empty")
            text = self.get_tokenizer().apply_chat_template(
                conversation,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                tokenize=False,
                **(chat_template_kwargs or {}),
            )
            # The template already holds the special tokens (BOS): do not add them again.
            ids = self.get_tokenizer().encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)
