"""What the OpenAI generation routes share: `OpenAIServing` (model check, engine state, load
shedding, sampling params, the engine boundary's checks as 400s, disconnect handling, audit),
`ServerState` (what the routes read), and the one ending of a streamed response:

    body events ... -> [usage chunk: the body's last]   (status "ok")
                    |  CancelledError: status "aborted", re-raised (the client is gone)
                    |  any other error: status per failure_status, one error event (headers are out)
    -> handles released, the audit line written -> [tenant validation event] -> data: [DONE]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response

from pagedserve.engine.async_llm import AsyncLLM, RequestHandle
from pagedserve.engine.messages import EngineDeadError
from pagedserve.engine.request_builder import InvalidInputError, PreparedPrompt
from pagedserve.entrypoints.openai.errors import (
    BadRequestError,
    NotFoundError,
    OpenAIError,
    ServerShutdownError,
    ServiceUnavailableError,
    error_sse,
    overloaded,
)
from pagedserve.entrypoints.openai.prompt_bounds import PromptBounds
from pagedserve.entrypoints.openai.protocol import _SamplingRequest, clamp_logprob, random_id
from pagedserve.entrypoints.openai.responses import SSE_DONE, PromptLogprob
from pagedserve.entrypoints.openai.structured_limits import StructuredOutputLimits, compile_request_grammar
from pagedserve.entrypoints.openai.tenancy import TenantGate, tenancy_of
from pagedserve.inputs import PromptType
from pagedserve.ops.audit import AuditLog
from pagedserve.ops.audit_middleware import claim_audit, write_line
from pagedserve.outputs import PromptLogprobs
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

T = TypeVar("T")
# nginx's "client closed request": what a non-streamed request whose client went away is logged
# and counted as (not a 5xx; nothing is sent, the client is gone).
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The client of a non-streamed request disconnected before its response was ready."""


@dataclass
class ServerState:
    """What the routes read; `engine` is None until the engine is ready."""

    served_model_names: list[str]
    max_model_len: int
    engine: AsyncLLM | None = None
    start_error: str | None = None
    chat_template: str | None = None
    max_waiting_requests: int | None = None
    audit: AuditLog | None = None
    # the model's generation_config defaults for knobs a request leaves unset (as vLLM)
    default_sampling_params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # "draining" (graceful shutdown) or "restarting" (a dead engine being replaced): /health and
    # new requests answer 503 while set (entrypoints/openai/lifecycle.py sets it)
    lifecycle_status: str | None = None
    bounds: PromptBounds = field(default_factory=PromptBounds)  # prompt count/size, template rules


@dataclass(slots=True)
class AuditInfo:
    request_id: str
    arrival_wall: float
    input: str | list[int] | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_parts: list[str] = field(default_factory=list)
    status: str = "error"  # "ok", "error", "aborted" (client gone), "shutdown" (cut at shutdown)
    http_status: int | None = 200  # the response's status; None when none was sent


class OpenAIServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def model_name(self) -> str:
        return self.state.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.state.served_model_names:
            raise NotFoundError(f"The model `{model}` does not exist.", param="model")

    def engine(self) -> AsyncLLM:
        if self.state.lifecycle_status == "draining":
            raise ServiceUnavailableError("The server is shutting down; send the request to another replica.")
        if self.state.lifecycle_status == "restarting":
            raise ServiceUnavailableError("The engine is restarting; retry shortly.", retry_after_s=5)
        engine = self.state.engine
        if engine is None:
            msg = self.state.start_error or "The engine is starting; retry shortly."
            raise ServiceUnavailableError(msg, retry_after_s=None if self.state.start_error else 5)
        if not engine.is_alive:
            raise ServiceUnavailableError("The engine is not running.")
        return engine

    def check_load(self, engine: AsyncLLM, num_new: int, priority_class: str = "interactive") -> None:
        """Load shedding: 429 once the waiting queue would pass --max-waiting-requests, or the
        predicted queueing delay the TTFT objective (slo_admission.py)."""
        limit = self.state.max_waiting_requests
        if limit is not None:
            waiting = engine.num_waiting_estimate
            if waiting + num_new > limit:
                raise overloaded(
                    f"Too many requests waiting ({waiting}, limit {limit}); retry later.", retry_after_s=1
                )
        admission = self.state.extra.get("slo")
        if admission is not None:
            admission.check(num_new, priority_class)

    def sampling_params(self, request: _SamplingRequest, prompt_len: int, stream: bool) -> SamplingParams:
        """The request's SamplingParams for a prompt of `prompt_len` tokens that passed
        AsyncLLM.prepare_prompt (which owns the prompt-length rule): the completion budget, then
        construction; the model's bounds are checked once, by `prepare_params`."""
        max_len = self.state.max_model_len
        requested = request.requested_max_tokens()
        if requested is not None and prompt_len + requested > max_len:
            raise BadRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
            )  # fmt: skip
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        return request.sampling_params(max_len - prompt_len, self.state.default_sampling_params, kind)

    @staticmethod
    def prepare_prompt(engine: AsyncLLM, request: _SamplingRequest, prompt: PromptType) -> PreparedPrompt:
        """The engine boundary's one prompt check (truncation included), as a 400 naming the field."""
        try:
            return engine.prepare_prompt(prompt, request.truncate_prompt_tokens)
        except InvalidInputError as e:
            raise BadRequestError(str(e), param=request.param_for(e.param)) from None
        except ValueError as e:  # cache_salt
            raise BadRequestError(str(e), param=request.param_for("prompt")) from None

    @staticmethod
    def prepare_params(engine: AsyncLLM, request: _SamplingRequest, params: SamplingParams) -> None:
        """The engine boundary's one check of the params against the model, as a 400."""
        try:
            engine.prepare_params(params)
        except InvalidInputError as e:
            raise BadRequestError(str(e), param=request.param_for(e.param)) from None

    async def compile_grammar(self, engine: AsyncLLM, request: _SamplingRequest, params: SamplingParams) -> str | None:
        """The serialized grammar of the request's structured-output spec (None without one):
        limits, then one compile off the event loop; a 400 naming the field on failure."""
        limits = self.state.extra.get("structured_output_limits") or StructuredOutputLimits()
        return await compile_request_grammar(engine, params.structured_outputs, limits,
                                             request.structured_outputs_param())

    def tenant_gate(self, raw: Request, request: _SamplingRequest, path: str) -> TenantGate:
        """The request's tenant policy at work (entrypoints/openai/tenancy.py)."""
        return tenancy_of(self.state.extra, self.state.served_model_names).gate(raw, request, path)

    def request_id(self, raw: Request, prefix: str) -> str:
        rid = getattr(raw.state, "request_id", None)
        return f"{prefix}-{rid}" if rid else random_id(prefix)

    def tenant(self, raw: Request) -> str | None:
        return getattr(getattr(raw.state, "principal", None), "tenant", None)

    def audit(self, raw: Request, info: AuditInfo) -> None:
        """The one detailed audit line of a served request; a second call for the same request
        (or one after the audit middleware wrote its line) writes nothing. A request cut without
        an outcome of its own ("aborted") is audited as the log's cut_status, which is
        "shutdown" once shutdown began (AuditLog.begin_shutdown())."""
        log = self.state.audit
        if log is None or not claim_audit(raw.scope.setdefault("state", {})):
            return
        status = log.cut_status if info.status == "aborted" else info.status
        principal = getattr(raw.state, "principal", None)
        write_line(
            log, request_id=info.request_id, tenant=self.tenant(raw), model=self.model_name,
            arrival_time=info.arrival_wall, finish_time=time.time(), prompt_tokens=info.prompt_tokens,
            completion_tokens=info.completion_tokens, status=status, input=info.input,
            output="".join(info.output_parts), client_request_id=getattr(raw.state, "client_request_id", None),
            key_id=getattr(principal, "key_id", None), method=raw.method, path=raw.url.path,
            http_status=None if status in ("aborted", "shutdown") else info.http_status,
        )  # fmt: skip

    async def stream_with_ending(
        self, raw: Request, body: AsyncIterator[str], info: AuditInfo, release: Callable[[], None],
        gate: TenantGate, response_id: str, object_name: str,
    ) -> AsyncIterator[str]:  # fmt: skip
        """A streamed response: the route's `body` events (its usage chunk last), then the one
        ending both routes share (see the module docstring)."""
        try:
            async for event in body:
                yield event
            info.status = "ok"
        except asyncio.CancelledError:
            info.status = "aborted"
            raise
        except Exception as e:  # noqa: BLE001 - headers are out: report inside the stream
            info.status = failure_status(e)
            yield error_sse(engine_error(e))
        finally:
            release()
            self.audit(raw, info)
        if (checked := gate.validation_event(response_id, object_name)) is not None:
            yield checked
        yield SSE_DONE

    @staticmethod
    async def until_disconnect(raw: Request, work: Awaitable[T]) -> T:
        """Runs `work`; cancels it (so its engine requests abort) if the client goes away."""
        task = asyncio.ensure_future(work)

        async def watch() -> None:
            while True:
                message = await raw.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()  # its generators close, which aborts the engine requests (KV freed)
            raise ClientDisconnected("client disconnected")
        return task.result()


async def run_to_end(
    serving: OpenAIServing, raw: Request, work: Awaitable[T], info: AuditInfo,
    handles: Sequence[RequestHandle], engine: AsyncLLM,
) -> T | Response:
    """Awaits a non-streamed request's outputs. A client that disconnects has its requests
    aborted (audited as such) and gets a 499 that nobody reads: logged and counted as a client
    disconnect, not a server error; an engine failure becomes its OpenAI error response; the
    handles are released on every path."""
    try:
        return await serving.until_disconnect(raw, work)
    except ClientDisconnected:
        info.status = "aborted"
        serving.audit(raw, info)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except asyncio.CancelledError:
        info.status = "aborted"
        serving.audit(raw, info)
        raise
    except Exception as e:  # noqa: BLE001 - every engine failure becomes an OpenAI error
        err = engine_error(e)
        info.http_status = err.status
        info.status = failure_status(e)
        serving.audit(raw, info)
        return err.to_response()
    finally:
        for handle in handles:
            engine.release(handle)


def failure_status(e: Exception) -> str:
    """The audit status of a request that ended with `e`."""
    return "shutdown" if isinstance(e, ServerShutdownError) else "error"


def engine_error(e: Exception) -> OpenAIError:
    if isinstance(e, EngineDeadError):
        return ServiceUnavailableError(f"The engine failed while serving the request: {e}")
    if isinstance(e, OpenAIError):
        return e
    return BadRequestError(str(e))


def prompt_logprobs_json(plp: PromptLogprobs | None) -> list[dict[int, PromptLogprob] | None] | None:
    if plp is None:
        return None
    return [
        None if d is None else {
            t: PromptLogprob(logprob=clamp_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
            for t, lp in d.items()
        }
        for d in plp
    ]  # fmt: skip
