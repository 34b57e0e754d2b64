"""A consumer that falls behind gets the DELTA outputs that queued up as one (AsyncLLM.stream,
merge_delta_outputs): the same text, token ids and logprobs in fewer events, the finish and an
error that was queued behind outputs kept in order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pagedserve import EngineArgs, SamplingParams
from pagedserve.core.outputs import EngineCoreOutput, FinishReason
from pagedserve.engine.async_llm import AsyncLLM
from pagedserve.engine.messages import EngineDeadError, OutputsMsg
from pagedserve.engine.request_builder import load_tokenizer
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput, merge_delta_outputs
from pagedserve.sampling_params import RequestOutputKind


def _out(index: int, text: str, ids: list[int], lp: bool = False, finish: str | None = None) -> CompletionOutput:
    logprobs = [{t: Logprob(-0.5)} for t in ids] if lp else None
    return CompletionOutput(index, text, ids, -float(len(ids)), logprobs, finish)


def _ro(outputs: list[CompletionOutput], finished: bool = False, prompt_lps: Any = None) -> RequestOutput:
    return RequestOutput("r", "p", [1, 2], prompt_lps, outputs, finished)


def test_merge_concatenates_each_completion_and_keeps_the_later_finish() -> None:
    first = _ro([_out(0, "a", [5], lp=True), _out(1, "x", [9], lp=True)], prompt_lps=[None, {2: Logprob(-1.0)}])
    later = _ro([_out(0, "b", [6], lp=True, finish="length")], finished=False)
    merged = merge_delta_outputs(first, later)
    assert [c.index for c in merged.outputs] == [0, 1]
    zero, one = merged.outputs
    assert (zero.text, zero.token_ids, zero.finish_reason, zero.cumulative_logprob) == ("ab", [5, 6], "length", -1.0)
    assert zero.logprobs == [{5: Logprob(-0.5)}, {6: Logprob(-0.5)}]
    assert (one.text, one.token_ids) == ("x", [9])  # only in the first: kept as it was
    assert merged.prompt_logprobs == first.prompt_logprobs and not merged.finished
    assert merge_delta_outputs(later, _ro([_out(0, "c", [7])], finished=True)).finished


class _Core:
    """An engine client that runs nothing: the test hands AsyncLLM its outputs."""

    def __init__(self) -> None:
        self.on_outputs: Any = None
        self.on_dead: Any = None
        self.is_alive, self.dead_reason, self.pid = True, None, None
        self.children: list[str] = []

    def add_request(self, msg: Any) -> None:
        self.children += [c.request_id for c in msg.children]

    def abort(self, child_ids: list[str]) -> None:
        pass


@pytest.fixture()
def llm(tiny_checkpoints: Any) -> tuple[AsyncLLM, _Core]:
    config = EngineArgs(model=tiny_checkpoints["llama"], device="cpu").create_engine_config()
    core = _Core()
    engine = AsyncLLM(config, core, load_tokenizer(config))  # type: ignore[arg-type]
    engine.request_builder.vocab_size = config.model_config.model_spec.vocab_size
    return engine, core


def _step(engine: AsyncLLM, child: str, token: int, finish: FinishReason | None = None) -> None:
    engine._on_outputs(OutputsMsg([EngineCoreOutput(child, [token], finish)], None))


def test_outputs_queued_while_the_consumer_was_busy_come_as_one(llm: tuple[AsyncLLM, _Core]) -> None:
    engine, core = llm

    async def run() -> list[RequestOutput]:
        params = SamplingParams(max_tokens=4, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        handle = engine.add_request({"prompt_token_ids": [3, 4, 5]}, params, "r1")
        [child] = core.children
        stream = engine.stream(handle)
        _step(engine, child, 10)
        got = [await stream.__anext__()]  # one output waiting: alone
        _step(engine, child, 11)
        _step(engine, child, 12)  # two waiting: one merged output
        got.append(await stream.__anext__())
        _step(engine, child, 13, FinishReason.LENGTH)
        got += [o async for o in stream]
        return got

    outs = asyncio.run(run())
    assert [o.outputs[0].token_ids for o in outs] == [[10], [11, 12], [13]]
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert engine.num_in_flight == 0


def test_an_error_behind_queued_outputs_comes_after_them(llm: tuple[AsyncLLM, _Core]) -> None:
    engine, core = llm

    async def run() -> tuple[list[RequestOutput], BaseException | None]:
        params = SamplingParams(max_tokens=8, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        handle = engine.add_request({"prompt_token_ids": [3, 4]}, params, "r2")
        [child] = core.children
        _step(engine, child, 20)
        _step(engine, child, 21)
        handle.queue.put_nowait(EngineDeadError("gone"))
        got: list[RequestOutput] = []
        try:
            async for o in engine.stream(handle):
                got.append(o)
        except EngineDeadError as e:
            return got, e
        return got, None

    outs, error = asyncio.run(run())
    assert [o.outputs[0].token_ids for o in outs] == [[20, 21]]
    assert isinstance(error, EngineDeadError)


def test_cumulative_outputs_are_not_merged(llm: tuple[AsyncLLM, _Core]) -> None:
    engine, core = llm

    async def run() -> list[RequestOutput]:
        params = SamplingParams(max_tokens=2, ignore_eos=True, output_kind=RequestOutputKind.CUMULATIVE)
        handle = engine.add_request({"prompt_token_ids": [3]}, params, "r3")
        [child] = core.children
        _step(engine, child, 30)
        _step(engine, child, 31, FinishReason.LENGTH)
        return [o async for o in engine.stream(handle)]

    outs = asyncio.run(run())
    assert [o.outputs[0].token_ids for o in outs] == [[30], [30, 31]]
