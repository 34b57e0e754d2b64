"""In-process pieces of the server: AsyncLLM over InprocClient, IPC message round trips, CLI flags."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from pagedserve import EngineArgs, SamplingParams
from pagedserve.core.outputs import EngineCoreOutput, FinishReason, LogprobsLists
from pagedserve.engine.async_llm import AsyncLLM
from pagedserve.engine.messages import (
    AddRequestMsg,
    ChildSpec,
    InputMsg,
    OutputMsg,
    OutputsMsg,
    requests_from_msg,
)
from pagedserve.engine.request_builder import RequestBuilder
from pagedserve.entrypoints.cli import main as cli_main
from pagedserve.entrypoints.openai.cli_args import engine_args_from, parse_args
from pagedserve.sampling_params import RequestOutputKind
from tests.server.conftest import ENGINE_KWARGS


def test_messages_round_trip() -> None:
    params = SamplingParams(n=3, temperature=0.7, seed=5, stop=["x"], logit_bias={4: 2.0}, logprobs=2,
                            output_kind=RequestOutputKind.DELTA)  # fmt: skip
    builder = RequestBuilder(tokenizer=None, max_model_len=64, max_num_seqs=8, max_logprobs=5,
                             vocab_size=32, eos_token_id=1, extra_eos_ids=[9])
    children = builder.child_params("r", params)
    assert [cid for cid, _ in children] == ["0_r", "1_r", "2_r"]
    assert [p.seed for _, p in children] == [5, 6, 7] and all(9 in p.stop_token_ids for _, p in children)
    msg = AddRequestMsg([ChildSpec(cid, p) for cid, p in children], [1, 2, 3], 1, 12.5, 2)
    decoded = msgspec.msgpack.Decoder(InputMsg).decode(msgspec.msgpack.encode(msg))  # type: ignore[arg-type]
    assert decoded == msg
    back = decoded.children[1].sampling_params  # typed: msgspec rebuilds the SamplingParams
    assert repr(back) == repr(children[1][1]) and back.logit_bias == {4: 2.0}
    leaders = requests_from_msg(decoded)  # a shared prompt: one leader carrying two followers
    assert [r.request_id for r in leaders] == ["0_r"]
    assert [f.request_id for f in leaders[0].followers] == ["1_r", "2_r"] and leaders[0].priority == 2
    single = AddRequestMsg(msg.children, [7], 1, 0.0)  # a one-token prompt: nothing to share
    assert [r.request_id for r in requests_from_msg(single)] == ["0_r", "1_r", "2_r"]
    out = OutputsMsg([EngineCoreOutput("a", [3], FinishReason.LENGTH, None, LogprobsLists([[3, 4]], [[-0.1, -2.0]], [1]))],
                     None)  # fmt: skip
    assert msgspec.msgpack.Decoder(OutputMsg).decode(msgspec.msgpack.encode(out)) == out  # type: ignore[arg-type]


def test_async_llm_inproc_matches_offline_and_aborts(tiny_checkpoints: Any, offline_llm: Any) -> None:
    prompts = ["the model runs", "a cat", "one two three four"]
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    expected = [o.outputs[0].text for o in offline_llm.generate(prompts, greedy, use_tqdm=False)]

    async def run() -> tuple[list[str], float]:
        args = EngineArgs(model=tiny_checkpoints["llama"], **ENGINE_KWARGS)
        llm = await AsyncLLM.from_engine_args(args, multiprocess=False)
        try:

            async def one(i: int, prompt: str) -> str:
                params = greedy.clone()
                params.output_kind = RequestOutputKind.DELTA
                text = ""
                async for ro in llm.generate(prompt, params, f"r{i}"):
                    text += ro.outputs[0].text if ro.outputs else ""
                return text

            texts = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])

            async def endless() -> None:
                long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
                async for _ in llm.generate("the model", long, "long"):
                    pass

            task = asyncio.create_task(endless())
            while llm.last_stats is None or llm.last_stats.num_running == 0:
                await asyncio.sleep(0.01)
            task.cancel()  # a client disconnect
            with pytest.raises(asyncio.CancelledError):
                await task
            assert llm.num_in_flight == 0
            for _ in range(200):  # the abort reaches the core between steps
                if llm.last_stats is not None and llm.last_stats.num_running == 0:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(ValueError, match="max_model_len"):
                await llm.generate([5] * 1000, greedy, "too-long").__anext__()
            return list(texts), llm.last_stats.kv_cache_usage if llm.last_stats else -1.0
        finally:
            await llm.shutdown()

    texts, usage = asyncio.run(run())
    assert texts == expected
    assert usage == 0.0


def test_cli_flags() -> None:
    args = parse_args(["--model", "m", "--max-model-len", "128", "--no-enable-prefix-caching", "--block-size", "32",
                       "--served-model-name", "a", "b", "--max-num-seqs", "4", "--seed", "3"])  # fmt: skip
    engine_args = engine_args_from(args)
    assert engine_args.max_model_len == 128 and engine_args.enable_prefix_caching is False
    assert (
        engine_args.block_size == 32
        and engine_args.served_model_name == "a"
        and engine_args.max_num_seqs == 4
    )
    bad = [
        ["--model", "m", "--bogus"],
        ["--model", "m", "--max-mod", "5"],  # no abbreviations
        ["--model", "m", "--enable-prefix-caching", "--no-enable-prefix-caching"],
        ["--model", "m", "--ssl-keyfile", "k.pem"],
        ["--model", "m", "--jwt-secret", "s"],
        ["--model", "m", "--max-num-seqs", "0"],
        ["--model", "m", "--tensor-parallel-size", "0"],
    ]
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2, argv
    with pytest.raises(SystemExit) as e:
        cli_main(["serve", "a", "--model", "b"])  # the model given twice, differently
    assert e.value.code == 2
    assert cli_main(["frobnicate"]) == 2


def test_cli_generate(tiny_checkpoints: Any, capsys: pytest.CaptureFixture[str], offline_llm: Any) -> None:
    want = offline_llm.generate(["the cat"], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    code = cli_main(["generate", "--model", tiny_checkpoints["llama"], "--max-tokens", "4", "--dtype", "float32",
                     "--max-model-len", "256", "--kv-cache-memory-bytes", str(8 << 20), "the cat"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.strip() == f"{'the cat'!r} -> {want[0].outputs[0].text!r}"
