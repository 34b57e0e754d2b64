"""LLMEngine: vLLM's synchronous engine API (add_request / step / abort_request).

    engine = LLMEngine.from_engine_args(EngineArgs(model=...))
    while True:
        for request_id, prompt, params in get_new_requests():
            engine.add_request(request_id, prompt, params)
        for output in engine.step():
            ...

A user request with n samples becomes n core requests "0_<id>" ... "<n-1>_<id>": the first is the
leader that computes the prompt, the others fork from it (see core/request.py). The fan-out is
RequestBuilder.fan_out's and the step EngineDriver's, the same as the server's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from pagedserve.config import EngineArgs, EngineConfig, check_priority_class
from pagedserve.engine.driver import EngineDriver
from pagedserve.engine.engine_core import EngineCore, EngineStats
from pagedserve.engine.messages import AbortMsg
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.request_builder import RequestBuilder, load_tokenizer
from pagedserve.inputs import PromptType
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model_config
        if config.cpu_threads is not None:  # in-process: torch's default unless asked (the caller's process)
            import torch

            torch.set_num_threads(config.cpu_threads)
        self.tokenizer = load_tokenizer(config)
        self.engine_core = EngineCore(config)
        self.driver = EngineDriver(self.engine_core)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.vocab_size = self.engine_core.vocab_size
        self.request_builder = RequestBuilder.from_config(config, self.tokenizer, self.vocab_size)
        self.request_builder.grammars = self.engine_core.grammars.cache  # one compile, shared

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ---------------------------------------------------------------- requests

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of any accepted prompt form."""
        return self.request_builder.tokenize(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        priority_class: str = "interactive",
    ) -> None:
        """priority_class: "interactive" or "batch" (waits behind interactive requests)."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        check_priority_class(priority_class)
        prepared = self.request_builder.prepare(prompt, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        msg = self.request_builder.fan_out(request_id, prepared, params, arrival, priority, priority_class)
        child_ids = [c.request_id for c in msg.children]
        self.output_processor.add_request(request_id, prepared.text, prepared.token_ids, params, child_ids, arrival)
        self.driver.apply([msg])

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        child_ids = self.output_processor.abort_requests(ids)
        self.driver.apply([AbortMsg(child_ids)])

    def step(self) -> list[RequestOutput]:
        processed = self.output_processor.process_outputs(self.driver.step_now().outputs)
        if processed.reqs_to_abort:  # finished by a stop string
            self.driver.apply([AbortMsg(processed.reqs_to_abort)])
        return processed.request_outputs

    def has_unfinished_requests(self) -> bool:
        # async scheduling: also while a step is in flight (its tokens may all be dropped), so
        # that `while has_unfinished_requests(): step()` leaves the engine idle
        return self.output_processor.has_unfinished_requests() or self.engine_core.step_in_flight

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()

    def get_stats(self) -> EngineStats:
        return self.engine_core.stats

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (they also stop when this engine is
        garbage collected, or when this process exits)."""
        self.engine_core.shutdown()
