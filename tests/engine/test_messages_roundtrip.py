"""Every IPC message between the front end and the engine-core process round-trips through
msgspec unchanged, SamplingParams typed (msgspec rebuilds the dataclass itself: no hand-written
dict path), whatever valid params a request carries (a hypothesis property)."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.core.outputs import EngineCoreOutput, FinishReason, LogprobsLists
from pagedserve.core.stats import SchedulerStats
from pagedserve.engine.messages import (
    AbortMsg,
    AddRequestMsg,
    ChildSpec,
    ErrorMsg,
    InputMsg,
    OutputMsg,
    OutputsMsg,
    ReadyMsg,
    ShutdownMsg,
)
from pagedserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
small = st.integers(0, 1000)
text = st.text(min_size=1, max_size=8)
ids = st.lists(st.integers(0, 50_000), max_size=6)

structured = st.one_of(
    st.none(),
    st.builds(StructuredOutputsParams, json=st.dictionaries(st.sampled_from(["type", "title"]), text, min_size=1)),
    st.builds(StructuredOutputsParams, regex=text),
    st.builds(StructuredOutputsParams, choice=st.lists(text, min_size=1, max_size=3)),
    st.builds(StructuredOutputsParams, grammar=text),
    st.builds(StructuredOutputsParams, json_object=st.just(True)),
)


@st.composite
def sampling_params(draw: Any) -> SamplingParams:
    max_tokens = draw(st.one_of(st.none(), st.integers(1, 4096)))
    n = draw(st.integers(1, 4))
    return SamplingParams(
        n=n, best_of=draw(st.sampled_from([None, n])),
        presence_penalty=draw(st.floats(-2, 2)), frequency_penalty=draw(st.floats(-2, 2)),
        repetition_penalty=draw(st.floats(0.01, 4)), temperature=draw(st.floats(0, 3)),
        top_p=draw(st.floats(0.01, 1)), top_k=draw(st.integers(-1, 100)), min_p=draw(st.floats(0, 1)),
        seed=draw(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1))),
        stop=draw(st.one_of(st.none(), text, st.lists(text, max_size=3))),
        stop_token_ids=draw(st.one_of(st.none(), ids)),
        include_stop_str_in_output=draw(st.booleans()), ignore_eos=draw(st.booleans()),
        max_tokens=max_tokens, min_tokens=draw(st.integers(0, max_tokens or 100)),
        logprobs=draw(st.one_of(st.none(), st.integers(0, 20))),
        prompt_logprobs=draw(st.one_of(st.none(), st.integers(0, 20))),
        skip_special_tokens=draw(st.booleans()), spaces_between_special_tokens=draw(st.booleans()),
        logit_bias=draw(st.one_of(st.none(), st.dictionaries(st.integers(0, 50_000), st.floats(-100, 100),
                                                             max_size=3))),
        output_kind=draw(st.sampled_from(list(RequestOutputKind))),
        truncate_prompt_tokens=draw(st.one_of(st.none(), st.integers(1, 4096))),
        structured_outputs=draw(structured),
    )  # fmt: skip


logprobs_lists = st.builds(
    lambda rows: LogprobsLists([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]),
    st.lists(st.tuples(ids, st.lists(finite, max_size=4), small), max_size=3),
)
core_output = st.builds(
    EngineCoreOutput, req_id=text, new_token_ids=ids,
    finish_reason=st.one_of(st.none(), st.sampled_from(list(FinishReason))),
    stop_reason=st.one_of(st.none(), small, text), new_logprobs=st.one_of(st.none(), logprobs_lists),
    new_prompt_logprobs=st.one_of(st.none(), logprobs_lists), num_cached_tokens=small,
    first_scheduled_time=st.one_of(st.none(), finite),
)  # fmt: skip
stats = st.builds(
    SchedulerStats, small, small, small, finite, small, small, small, small, small, small,
    slo_max_num_seqs=small, slo_token_budget=small, num_waiting_batch=small,
    admit_rate_interactive=st.one_of(st.none(), finite), admit_rate_batch=st.one_of(st.none(), finite),
)  # fmt: skip
input_msg = st.one_of(
    st.builds(
        AddRequestMsg, children=st.lists(st.builds(ChildSpec, text, sampling_params()), min_size=1, max_size=3),
        prompt_token_ids=ids, eos_token_id=st.one_of(st.none(), small), arrival_time=finite,
        priority=st.integers(-(2**63), 2**63 - 1), priority_class=st.sampled_from(["interactive", "batch"]),
        grammar=st.one_of(st.none(), text), cache_salt=st.one_of(st.none(), text),
    ),
    st.builds(AbortMsg, st.lists(text, max_size=4)),
    st.just(ShutdownMsg()),
)  # fmt: skip
output_msg = st.one_of(
    st.builds(ReadyMsg, small, small, small, small, small, small, finite),
    st.builds(ErrorMsg, text, st.booleans()),
    st.builds(OutputsMsg, st.lists(core_output, max_size=3), st.one_of(st.none(), stats)),
)

INPUT_DECODER = msgspec.msgpack.Decoder(InputMsg)  # type: ignore[arg-type]
OUTPUT_DECODER = msgspec.msgpack.Decoder(OutputMsg)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(input_msg)
def test_input_messages_round_trip(msg: Any) -> None:
    back = INPUT_DECODER.decode(msgspec.msgpack.encode(msg))
    assert back == msg and type(back) is type(msg)
    if isinstance(msg, AddRequestMsg):
        for sent, got in zip(msg.children, back.children):
            assert type(got.sampling_params) is SamplingParams  # typed, not a dict
            assert repr(got.sampling_params) == repr(sent.sampling_params)
            assert got.sampling_params.output_kind is sent.sampling_params.output_kind


@settings(max_examples=150, deadline=None)
@given(output_msg)
def test_output_messages_round_trip(msg: Any) -> None:
    back = OUTPUT_DECODER.decode(msgspec.msgpack.encode(msg))
    assert back == msg and type(back) is type(msg)
