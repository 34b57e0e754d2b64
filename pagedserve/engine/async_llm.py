"""AsyncLLM: the asyncio front of the engine, used by the HTTP server.

    generate(prompt, params, request_id) ──tokenize──> OutputProcessor.add_request
                                          ──AddRequestMsg──> engine core (own process or in-proc)
    engine outputs ──> OutputProcessor.process_outputs ──> per-request asyncio.Queue ──> generate()

Everything here runs on the event loop thread; the engine step never does (it runs in the core
process, or in a worker thread for InprocClient). A generate() that is cancelled (client
disconnect) or abandoned aborts its request, so its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pagedserve.config import EngineArgs, EngineConfig
from pagedserve.core.stats import SchedulerStats
from pagedserve.engine.core_client import EngineCoreClient, make_client
from pagedserve.engine.engine_core_proc import LogSettings
from pagedserve.engine.grammar_pool import GrammarService
from pagedserve.engine.messages import EngineDeadError, OutputsMsg, ReadyMsg
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.request_builder import PreparedPrompt, RequestBuilder, load_tokenizer
from pagedserve.inputs import PromptType
from pagedserve.outputs import RequestOutput, merge_delta_outputs
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class FinishedRequestStats:
    """What the metrics need of one finished request."""

    finished_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    generation_tokens: int
    ttft: float | None
    tpot: float | None
    e2e: float
    queue_time: float | None = None  # arrival -> first scheduled
    priority_class: str = "interactive"


@dataclass(slots=True)
class RequestHandle:
    """One added request: its output queue and what the metrics need when it ends."""

    request_id: str
    params: SamplingParams
    num_prompt_tokens: int
    arrival: float
    queue: asyncio.Queue[RequestOutput | BaseException]
    finished: bool = False
    num_generated: int = 0
    priority_class: str = "interactive"


StatsListener = Callable[[SchedulerStats], None]
FinishedListener = Callable[[FinishedRequestStats], None]
DeadListener = Callable[[str], None]  # called after the in-flight requests were failed


class AsyncLLM:
    def __init__(self, config: EngineConfig, client: EngineCoreClient, tokenizer: Any) -> None:
        self.config = config
        self.client = client
        self.tokenizer = tokenizer
        self.output_processor = OutputProcessor(tokenizer)
        self.max_model_len = config.scheduler_config.max_model_len
        self.request_builder = RequestBuilder.from_config(config, tokenizer)  # vocab set when ready
        self.last_stats: SchedulerStats | None = None
        self.stats_listeners: list[StatsListener] = []
        self.finished_listeners: list[FinishedListener] = []
        self.dead_listeners: list[DeadListener] = []
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._grammar_service: GrammarService | None = None
        client.on_outputs = self._on_outputs
        client.on_dead = self._on_dead

    @classmethod
    async def from_engine_args(cls, engine_args: EngineArgs, multiprocess: bool = True) -> AsyncLLM:
        config = engine_args.create_engine_config()
        return await cls.from_config(config, multiprocess)

    @classmethod
    async def from_config(
        cls, config: EngineConfig, multiprocess: bool = True, log: LogSettings | None = None
    ) -> AsyncLLM:
        """log: the engine process's log settings (the server passes its own)."""
        tokenizer = await asyncio.to_thread(load_tokenizer, config)
        client = make_client(config, multiprocess, log)
        llm = cls(config, client, tokenizer)
        ready = await client.start()
        llm.request_builder.vocab_size = ready.vocab_size
        return llm

    # ------------------------------------------------------------------ health and stats

    @property
    def is_alive(self) -> bool:
        return self.client.is_alive

    def check_health(self) -> None:
        if not self.client.is_alive:
            raise EngineDeadError(self.client.dead_reason or "the engine is not running")

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    @property
    def num_waiting_estimate(self) -> int:
        """Requests not running in the engine: those beyond max_num_seqs right now, or more when
        the last step report saw a longer queue (KV-cache bound), capped by what is in flight."""
        in_flight = len(self._queues)
        reported = self.last_stats.num_waiting if self.last_stats is not None else 0
        return max(in_flight - self.config.scheduler_config.max_num_seqs, min(reported, in_flight))

    # ------------------------------------------------------------------ tokenization

    @property
    def vocab_size(self) -> int:
        return self.request_builder.vocab_size

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        return self.request_builder.tokenize(prompt)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        text = self.tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            tokenize=False,
            **(chat_template_kwargs or {}),
        )
        if not isinstance(text, str):
            raise ValueError("the chat template did not render to text")
        return text

    def grammar_service(self, num_workers: int = 2, cache_entries: int = 256) -> GrammarService:
        """The compiler of structured-output specs (worker processes, started on first use); the
        arguments apply when it is first asked for."""
        if self._grammar_service is None:
            self._grammar_service = GrammarService(self.tokenizer, self.vocab_size, num_workers=num_workers,
                                                   cache_entries=cache_entries)
        return self._grammar_service

    async def compile_grammar(self, params: SamplingParams, timeout_s: float = 30.0) -> str | None:
        """The serialized grammar of a structured request (None for others), compiled off the
        event loop; GrammarError when the spec does not compile (within timeout_s)."""
        if params.structured_outputs is None:
            return None
        return await self.grammar_service().compile(params.structured_outputs, timeout_s)

    def prepare_prompt(self, prompt: PromptType, truncate_prompt_tokens: int | None = None) -> PreparedPrompt:
        """The prompt checked once at the engine boundary (InvalidInputError names the field)."""
        return self.request_builder.prepare_prompt(prompt, truncate_prompt_tokens)

    def prepare_params(self, params: SamplingParams) -> None:
        """The params checked once against the model (InvalidInputError names the field)."""
        self.request_builder.prepare_params(params)

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt: PromptType | PreparedPrompt,
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        grammar: str | None = None,
        priority_class: str = "interactive",
    ) -> RequestHandle:
        """Validate, register and send one request now (synchronously, so load accounting sees it
        at once). Raises ValueError for bad input, EngineDeadError when the engine is gone.
        Consume it with `stream(handle)`; a handle that is never streamed must be `abort`ed.
        grammar: compile_grammar(params) of a structured request (without it the engine compiles
        the spec itself, in the background, and a spec that fails there ends as aborted).
        A PreparedPrompt (prepare_prompt + prepare_params, as the server routes do) is taken as it
        is: a request is validated once."""
        self.check_health()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        prepared = prompt if isinstance(prompt, PreparedPrompt) else self.request_builder.prepare(prompt, params)
        token_ids = prepared.token_ids
        arrival = time.monotonic()
        msg = self.request_builder.fan_out(request_id, prepared, params, arrival, priority, priority_class, grammar)
        child_ids = [c.request_id for c in msg.children]
        self.output_processor.add_request(request_id, prepared.text, token_ids, params, child_ids, arrival)
        try:
            self.client.add_request(msg)
        except Exception:
            self.output_processor.abort_requests([request_id])
            raise
        handle = RequestHandle(request_id, params, len(token_ids), arrival, asyncio.Queue(),
                               priority_class=priority_class)
        self._queues[request_id] = handle.queue
        return handle

    async def stream(self, handle: RequestHandle) -> AsyncIterator[RequestOutput]:
        """The outputs of an added request until it finishes; leaving early aborts it. DELTA
        outputs that queued up while the consumer was busy come as one (merge_delta_outputs)."""
        first: float | None = None
        last: float | None = None
        queued: float | None = None
        reason = "abort"
        merge = handle.params.output_kind == RequestOutputKind.DELTA
        error: BaseException | None = None  # queued behind outputs: raised after they are out
        try:
            while not handle.finished:
                if error is not None:
                    raise error
                item = await handle.queue.get()
                if isinstance(item, BaseException):
                    raise item
                while merge and not item.finished and not handle.queue.empty():
                    later = handle.queue.get_nowait()
                    if isinstance(later, BaseException):
                        error = later
                        break
                    item = merge_delta_outputs(item, later)
                handle.finished = item.finished
                if item.metrics is not None:
                    first, last = item.metrics.first_token_time, item.metrics.last_token_time
                    queued = item.metrics.queue_time
                handle.num_generated = self._count_tokens(item, handle.params, handle.num_generated)
                if item.finished and item.outputs:
                    reason = item.outputs[0].finish_reason or "stop"
                yield item
        finally:
            self._finish(handle, reason, first, last, queued)

    def _finish(
        self, handle: RequestHandle, reason: str, first: float | None, last: float | None,
        queued: float | None = None,
    ) -> None:
        if self._queues.pop(handle.request_id, None) is None:
            return  # already accounted for
        if not handle.finished:  # cancelled, abandoned, or the engine died: free its blocks
            self._abort_now(handle.request_id)
        n = handle.num_generated
        tpot = (last - first) / (n - 1) if first is not None and last is not None and n > 1 else None
        self._notify_finished(FinishedRequestStats(
            reason, handle.num_prompt_tokens, n, None if first is None else first - handle.arrival, tpot,
            time.monotonic() - handle.arrival, queued, handle.priority_class,
        ))  # fmt: skip

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs (per params.output_kind) until it finishes. Raises
        ValueError for bad input (GrammarError for a spec that does not compile),
        EngineDeadError when the engine dies mid-request."""
        grammar = await self.compile_grammar(params)
        handle = self.add_request(prompt, params, request_id, priority, grammar=grammar)
        async for item in self.stream(handle):
            yield item

    def release(self, handle: RequestHandle) -> None:
        """Abort a handle that will not be streamed (or whose stream was abandoned)."""
        self._finish(handle, "abort", None, None)

    @staticmethod
    def _count_tokens(item: RequestOutput, params: SamplingParams, so_far: int) -> int:
        if params.output_kind == RequestOutputKind.DELTA:
            return so_far + sum(len(c.token_ids) for c in item.outputs)
        return sum(len(c.token_ids) for c in item.outputs)

    def _notify_finished(self, stats: FinishedRequestStats) -> None:
        for listener in self.finished_listeners:
            try:
                listener(stats)
            except Exception:  # noqa: BLE001 - metrics must never break a request
                logger.exception("finished-request listener failed")

    def _abort_now(self, request_id: str) -> None:
        child_ids = self.output_processor.abort_requests([request_id])
        if child_ids and self.client.is_alive:
            self.client.abort(child_ids)

    async def abort(self, request_id: str) -> None:
        """Abort a running request; its generate() ends with an outputs-less stop (cancellation
        from the caller's side is the usual way; this is for out-of-band aborts)."""
        self._abort_now(request_id)
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    # ------------------------------------------------------------------ engine callbacks

    def _on_outputs(self, msg: OutputsMsg) -> None:
        if msg.stats is not None:
            self.last_stats = msg.stats
            for listener in self.stats_listeners:
                try:
                    listener(msg.stats)
                except Exception:  # noqa: BLE001
                    logger.exception("stats listener failed")
        if not msg.outputs:
            return
        processed = self.output_processor.process_outputs(msg.outputs)
        for ro in processed.request_outputs:
            queue = self._queues.get(ro.request_id)
            if queue is not None:
                queue.put_nowait(ro)
        if processed.reqs_to_abort:  # finished by a stop string: stop the core computing them
            self.client.abort(processed.reqs_to_abort)

    def fail_all(self, error: BaseException) -> int:
        """End every in-flight request with `error` (each stream raises it) and tell a live engine
        to stop computing them. Returns how many were failed."""
        ids = list(self._queues)
        for request_id in ids:
            self._abort_now(request_id)
            self._queues[request_id].put_nowait(error)
        return len(ids)

    def _on_dead(self, reason: str) -> None:
        self.fail_all(EngineDeadError(f"the engine stopped: {reason}"))
        for listener in self.dead_listeners:
            try:
                listener(reason)
            except Exception:  # noqa: BLE001
                logger.exception("engine-dead listener failed")

    async def restart(self) -> ReadyMsg:
        """Replace a dead engine core by a fresh one of the same config (in place: listeners,
        tokenizer and routes stay). In-flight requests were already failed by the death; until
        the new core is ready `is_alive` stays False, so new requests get EngineDeadError."""
        old = self.client
        await old.shutdown()
        client = old.fresh()
        client.on_outputs = self._on_outputs
        client.on_dead = self._on_dead
        try:
            ready = await client.start()
        except BaseException:  # a failed start (or a cancelled restart) leaves no process behind
            await client.shutdown()
            raise
        self.client = client
        self.request_builder.vocab_size = ready.vocab_size
        self.last_stats = None
        return ready

    async def shutdown(self) -> None:
        if self._grammar_service is not None:
            self._grammar_service.shutdown()
        await self.client.shutdown()
