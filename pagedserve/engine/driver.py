"""The one driver of an engine core: apply inputs, step, emit outputs. Every place that runs a
core uses it, so there is one loop body:

    LLMEngine.step            apply (add/abort as they come) -> step_now -> outputs to the caller
    InprocClient._drive       apply the queued messages -> step (worker thread) -> on_outputs
    engine_core_proc loop     apply the drained socket -> step -> OutputsMsg on the socket

    step(report_idle):  work to do (admit_ready)?  -> core.step() -> OutputsMsg(outputs, last stats)
                        none, report_idle          -> OutputsMsg([], idle stats)  (the freed KV cache)
                        none                       -> None
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pagedserve.engine.messages import (
    AbortMsg,
    AddRequestMsg,
    InputMsg,
    OutputsMsg,
    ShutdownMsg,
    requests_from_msg,
)

if TYPE_CHECKING:
    from pagedserve.engine.engine_core import EngineCore


class EngineDriver:
    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def apply(self, inputs: Iterable[InputMsg]) -> bool:
        """Hand the inputs to the core in order; False at a ShutdownMsg (the rest is dropped)."""
        for msg in inputs:
            if isinstance(msg, AddRequestMsg):
                for request in requests_from_msg(msg):
                    self.core.add_request(request, msg.grammar)
            elif isinstance(msg, AbortMsg):
                self.core.abort_requests(msg.request_ids)
            elif isinstance(msg, ShutdownMsg):
                return False
        return True

    def has_work(self) -> bool:
        """Whether a step would do something (False while only grammars are being prepared)."""
        return self.core.admit_ready()

    def step(self, report_idle: bool = False) -> OutputsMsg | None:
        """A step when there is work (the loops of the clients)."""
        if self.core.admit_ready():
            return self.step_now()
        if report_idle:
            return OutputsMsg([], self.core.idle_stats())
        return None

    def step_now(self) -> OutputsMsg:
        """One core step whatever the state (LLMEngine.step, as vLLM's: a step with nothing to
        schedule still hands the worker the ids of the requests that finished since)."""
        return OutputsMsg(self.core.step(), self.core.stats.last)
