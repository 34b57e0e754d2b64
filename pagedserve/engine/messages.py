"""The messages between the front end (AsyncLLM) and the engine core, typed msgspec structs.

    front end ──InputMsg──>  engine core     AddRequestMsg | AbortMsg | ShutdownMsg
    front end <─OutputMsg──  engine core     ReadyMsg (once) | OutputsMsg (per step) | ErrorMsg

They travel as msgpack between processes (engine_core_proc.py) and as the objects themselves in
one process (core_client.InprocClient). Every field is typed, SamplingParams included: msgspec
encodes the dataclass and rebuilds it on decode (its __post_init__ runs, so what arrives is a
normal, normalised SamplingParams), the outputs are the `EngineCoreOutput` dataclasses of
core/outputs.py.

A user request with n samples is one `AddRequestMsg` holding n children ("<i>_<id>"), built by
RequestBuilder.fan_out for every front end (LLMEngine, AsyncLLM); the engine side links them as
leader + followers in one place (`requests_from_msg`, `link_children`).
"""

from __future__ import annotations

import msgspec

from pagedserve.core.outputs import EngineCoreOutput
from pagedserve.core.request import Request
from pagedserve.core.stats import SchedulerStats
from pagedserve.sampling_params import SamplingParams


class ChildSpec(msgspec.Struct):
    request_id: str
    sampling_params: SamplingParams  # msgspec encodes and decodes the dataclass itself


class AddRequestMsg(msgspec.Struct, tag="add"):
    """One user request: its children share the prompt; children[0] leads when it can fork."""

    children: list[ChildSpec]
    prompt_token_ids: list[int]
    eos_token_id: int | None
    arrival_time: float  # time.monotonic(): CLOCK_MONOTONIC is system-wide on Linux
    priority: int = 0
    priority_class: str = "interactive"  # or "batch"
    # the children's structured output grammar, compiled and serialized by the front end (the
    # engine deserializes it off its step loop instead of compiling again): structured_output.py
    grammar: str | None = None
    cache_salt: str | None = None  # vLLM's cache_salt: enters the first block's prefix-cache hash


class AbortMsg(msgspec.Struct, tag="abort"):
    request_ids: list[str]  # child ids


class ShutdownMsg(msgspec.Struct, tag="shutdown"):
    pass


class ReadyMsg(msgspec.Struct, tag="ready"):
    pid: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    block_size: int
    kv_capacity_tokens: int
    vocab_size: int
    startup_seconds: float


class ErrorMsg(msgspec.Struct, tag="error"):
    message: str
    fatal: bool = True


class OutputsMsg(msgspec.Struct, tag="outputs"):
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats | None  # the step's scheduler snapshot (also sent alone when idle)


InputMsg = AddRequestMsg | AbortMsg | ShutdownMsg
OutputMsg = ReadyMsg | ErrorMsg | OutputsMsg


class EngineDeadError(RuntimeError):
    """The engine core is gone: requests cannot make progress."""


def link_children(children: list[Request]) -> list[Request]:
    """The requests to hand to the scheduler: the leader (followers attached) when the prompt has
    more than one token to share, else every child on its own."""
    if len(children) > 1 and children[0].num_prompt_tokens > 1:
        children[0].followers = children[1:]
        return children[:1]
    return children


def requests_from_msg(msg: AddRequestMsg) -> list[Request]:
    """The core requests of one user request, linked for the scheduler (link_children)."""
    children = [
        Request(
            request_id=c.request_id,
            prompt_token_ids=list(msg.prompt_token_ids),
            sampling_params=c.sampling_params,
            eos_token_id=msg.eos_token_id,
            arrival_time=msg.arrival_time,
            priority=msg.priority,
            cache_salt=msg.cache_salt,
            priority_class=msg.priority_class,
        )
        for c in msg.children
    ]
    return link_children(children)
