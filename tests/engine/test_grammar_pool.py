"""GrammarService: compiles in worker processes, kills one that passes the deadline (and the next
compile still works), compiles identical specs once, caches errors, and keeps the event loop free
while a compile runs."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from pagedserve import StructuredOutputsParams
from pagedserve.engine.grammar_pool import GrammarService, GrammarTimeout
from pagedserve.structured_output import GrammarError

pytest.importorskip("xgrammar")

# a 100,000-value enum: minutes of compile time, far past the 2 s deadline used here
HUGE = StructuredOutputsParams(json={"type": "string", "enum": [f"value-{i}" for i in range(100_000)]})


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])


def test_deadline_kills_the_worker_and_the_loop_stays_free(tokenizer: Any) -> None:
    import xgrammar as xgr

    async def run() -> None:
        service = GrammarService(tokenizer, len(tokenizer), num_workers=1)
        try:
            await service.compile(StructuredOutputsParams(regex="a+"), 60)  # starts the worker
            worker = next(iter(service._workers))
            ticks = 0

            async def ticker() -> None:  # runs only if the loop is not blocked by the compile
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.05)
                    ticks += 1

            task = asyncio.create_task(ticker())
            with pytest.raises(GrammarTimeout, match="too complex to compile within 2 s"):
                await service.compile(HUGE, 2)
            task.cancel()
            assert ticks > 0
            assert not worker.proc.is_alive()  # killed, not left compiling
            # the same spec again: the cached error, no second compile
            compiles = service.num_compiles
            with pytest.raises(GrammarTimeout):
                await service.compile(HUGE, 2)
            assert service.num_compiles == compiles
            # a fresh worker takes the next spec; its grammar loads against the engine's tokenizer
            serialized = await service.compile(StructuredOutputsParams(choice=["x", "y"]), 60)
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
            xgr.GrammarMatcher(xgr.CompiledGrammar.deserialize_json(serialized, info))
        finally:
            service.shutdown()

    asyncio.run(run())


def test_identical_specs_compile_once_and_errors_are_clean(tokenizer: Any) -> None:
    async def run() -> None:
        service = GrammarService(tokenizer, len(tokenizer), num_workers=2)
        try:
            spec = {"type": "object", "properties": {"a": {"type": "integer"}}}
            results = await asyncio.gather(*(service.compile(StructuredOutputsParams(json=spec), 60)
                                             for _ in range(4)))
            assert len(set(results)) == 1 and service.num_compiles == 1
            with pytest.raises(GrammarError) as info:
                await service.compile(StructuredOutputsParams(json=json.dumps({"type": "strin"})), 60)
            message = str(info.value)
            assert message == 'invalid structured output json: the JSON schema is invalid: Unsupported type "strin".'
            with pytest.raises(GrammarError, match="grammar is invalid: .*not defined"):
                await service.compile(StructuredOutputsParams(grammar="root ::= nothing_here"), 60)
        finally:
            service.shutdown()

    asyncio.run(run())


def test_a_cancelled_caller_does_not_cancel_the_shared_compile(tokenizer: Any) -> None:
    async def run() -> None:
        service = GrammarService(tokenizer, len(tokenizer), num_workers=1)
        try:
            spec = StructuredOutputsParams(regex="[a-z]{1,5}")
            first = asyncio.create_task(service.compile(spec, 60))
            second = asyncio.create_task(service.compile(spec, 60))
            await asyncio.sleep(0)  # both are waiting on the one compile
            first.cancel()
            serialized = await second
            assert first.cancelled() and serialized
            assert await service.compile(spec, 60) == serialized and service.num_compiles == 1
        finally:
            service.shutdown()

    asyncio.run(run())


def test_a_worker_that_cannot_start_fails_every_waiter(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: GrammarService) -> Any:
        raise RuntimeError("no worker")

    monkeypatch.setattr(GrammarService, "_start_worker", broken)

    async def run() -> None:
        service = GrammarService(tokenizer, len(tokenizer), num_workers=1)
        results = await asyncio.gather(service.compile(StructuredOutputsParams(regex="a"), 60),
                                       service.compile(StructuredOutputsParams(regex="b"), 60),
                                       return_exceptions=True)
        assert [type(r) for r in results] == [RuntimeError, RuntimeError]  # none left waiting
        service.shutdown()

    asyncio.run(run())
