"""OutputProcessor: hand-made EngineCoreOutputs in, vLLM-compatible RequestOutputs out."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from pagedserve.core.outputs import EngineCoreOutput, FinishReason, LogprobsLists
from pagedserve.engine.output_processor import OutputProcessor, find_stop_string
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

CUM, DELTA, FINAL = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY
UTF8_TEXT = "naïve café 日本語 🙂 and more"
EOS = 1


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from pagedserve.testing.checkpoints import build_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(Path(path)))
    assert tokenizer.eos_token_id == EOS
    return tokenizer


class SlowTokenizer:
    """A tokenizer without a Rust backend: exercises the re-decoding fallback."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))


def out(req_id: str, ids: list[int], finish: FinishReason | None = None, **kw: Any) -> EngineCoreOutput:
    return EngineCoreOutput(req_id=req_id, new_token_ids=ids, finish_reason=finish, **kw)


def start(
    tokenizer: Any, params: SamplingParams, rid: str = "r", prompt_ids: list[int] | None = None
) -> OutputProcessor:
    proc = OutputProcessor(tokenizer)
    children = [rid] if params.n == 1 else [f"{i}_{rid}" for i in range(params.n)]
    proc.add_request(rid, "prompt", prompt_ids or [0, 70, 71], params, children, arrival_time=0.0)
    return proc


def feed(
    proc: OutputProcessor, rid: str, chunks: list[list[int]], final: FinishReason | None
) -> list[RequestOutput]:
    results = []
    for i, chunk in enumerate(chunks):
        finish = final if i == len(chunks) - 1 else None
        results.extend(proc.process_outputs([out(rid, chunk, finish)]).request_outputs)
    return results


def chunked(ids: list[int], rng: random.Random) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = rng.choice((1, 1, 1, 2, 3))
        chunks.append(ids[i : i + n])
        i += n
    return chunks


def enc(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------- detokenization


@pytest.mark.parametrize("slow", [False, True])
def test_text_equals_decode_of_random_sequences(tok: Any, slow: bool) -> None:
    tokenizer = SlowTokenizer(tok) if slow else tok
    rng = random.Random(0)
    utf8 = enc(tok, UTF8_TEXT)
    assert any(tok.decode([t]) == "\ufffd" for t in utf8)  # characters really are split across tokens
    sequences = [utf8, utf8[:3], [EOS, *utf8[:9], 4, 2]]
    sequences += [
        [rng.randrange(len(tok)) for _ in range(rng.randint(1, 25))] for _ in range(25 if not slow else 6)
    ]
    for ids in sequences:
        for skip in (True, False):
            want = tok.decode(ids, skip_special_tokens=skip)
            for kind in (CUM, DELTA):
                proc = start(
                    tokenizer, SamplingParams(skip_special_tokens=skip, output_kind=kind, max_tokens=None)
                )
                results = feed(proc, "r", chunked(ids, rng), FinishReason.LENGTH)
                texts = [r.outputs[0].text for r in results]
                if kind == CUM:
                    assert texts[-1] == want
                    assert all(want.startswith(t) for t in texts)  # nothing shown is taken back
                    assert results[-1].outputs[0].token_ids == ids
                else:
                    assert "".join(texts) == want
                    assert sum((r.outputs[0].token_ids for r in results), []) == ids
                assert results[-1].finished and results[-1].outputs[0].finish_reason == "length"
                assert not any(r.finished for r in results[:-1])
                assert not proc.has_unfinished_requests()


def test_no_tokenizer_or_detokenize_false_gives_empty_text(tok: Any) -> None:
    for tokenizer, params in (
        (None, SamplingParams(logprobs=1)),
        (tok, SamplingParams(detokenize=False, logprobs=1)),
    ):
        proc = start(tokenizer, params)
        lp = LogprobsLists([[80, 81]], [[-0.5, -0.1]], [2])
        (res,) = proc.process_outputs([out("r", [80], FinishReason.LENGTH, new_logprobs=lp)]).request_outputs
        assert res.outputs[0].text == "" and res.outputs[0].token_ids == [80]
        assert res.outputs[0].logprobs is not None and res.outputs[0].logprobs[0][80].decoded_token is None
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        start(None, SamplingParams(stop=["x"]))


# ---------------------------------------------------------------------------- stop handling


def test_find_stop_string() -> None:
    assert find_stop_string("abcSTOPx", 5, ["STOP"], False) == ("STOP", 3)  # straddles new_from
    assert find_stop_string("abcSTOPx", 5, ["STOP"], True) == ("STOP", 7)
    assert find_stop_string("STOP abc", 5, ["STOP"], False) is None  # ended before the new text
    assert find_stop_string("xx b a", 0, ["a", "b"], False) == ("b", 3)  # the earliest wins


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("kind", [CUM, DELTA])
def test_stop_string_straddling_deltas(tok: Any, include: bool, kind: RequestOutputKind) -> None:
    ids = enc(tok, "hello world. STOP here and more")
    params = SamplingParams(stop=["STOP", "never"], include_stop_str_in_output=include, output_kind=kind)
    proc = start(tok, params)
    results: list[RequestOutput] = []
    aborted: list[str] = []
    for t in ids:  # one token per step: "STOP" arrives as S, T, O, P
        processed = proc.process_outputs([out("r", [t])])
        results.extend(processed.request_outputs)
        aborted.extend(processed.reqs_to_abort)
        if results[-1].finished:
            break
    want = "hello world. STOP" if include else "hello world. "
    final = results[-1].outputs[0]
    assert aborted == ["r"] and results[-1].finished
    assert (final.finish_reason, final.stop_reason) == ("stop", "STOP")
    if kind == CUM:
        assert final.text == want
        assert final.token_ids == ids[: len(final.token_ids)]  # token ids are not truncated
        # while running, the last len("never") - 1 = 4 characters are held back
        assert all(len(r.outputs[0].text) <= len(want) for r in results)
    else:
        assert "".join(r.outputs[0].text for r in results) == want
    assert not any("S" in r.outputs[0].text for r in results) or include
    # the core may still send a token before it sees the abort: ignored
    assert proc.process_outputs([out("r", [ids[-1]])]).request_outputs == []
    assert not proc.has_unfinished_requests()


def test_stop_string_not_checked_within_min_tokens(tok: Any) -> None:
    ids = enc(tok, "STOP then STOP")  # S T O P _ then _ S T O P
    params = SamplingParams(stop=["STOP"], min_tokens=4)
    proc = start(tok, params)
    processed = proc.process_outputs([out("r", ids[:6])])
    assert processed.reqs_to_abort == [] and not processed.request_outputs[0].finished
    processed = proc.process_outputs([out("r", ids[6:])])
    assert processed.reqs_to_abort == ["r"]
    assert (
        processed.request_outputs[0].outputs[0].text
        == tok.decode(ids[:6]) + tok.decode(ids[6:]).split("STOP")[0]
    )


def test_stop_token_is_kept_in_ids_but_not_in_text(tok: Any) -> None:
    body = enc(tok, "hello world")
    stop_tok = enc(tok, ".")[0]
    cases = [
        (SamplingParams(skip_special_tokens=False), EOS, None, "hello world"),
        (SamplingParams(stop_token_ids=[stop_tok]), stop_tok, stop_tok, "hello world"),
        (
            SamplingParams(stop_token_ids=[stop_tok], include_stop_str_in_output=True),
            stop_tok,
            stop_tok,
            "hello world.",
        ),
    ]
    for params, last, stop_reason, text in cases:
        proc = start(tok, params)
        proc.process_outputs([out("r", body[:3])])
        (res,) = proc.process_outputs(
            [out("r", [*body[3:], last], FinishReason.STOP, stop_reason=stop_reason)]
        ).request_outputs
        c = res.outputs[0]
        assert c.text == text and c.token_ids == [*body, last]
        assert (c.finish_reason, c.stop_reason) == ("stop", stop_reason)


@pytest.mark.parametrize(("reason", "name"), [(FinishReason.LENGTH, "length"), (FinishReason.ABORT, "abort")])
def test_finish_reasons(tok: Any, reason: FinishReason, name: str) -> None:
    proc = start(tok, SamplingParams())
    (res,) = proc.process_outputs([out("r", [], reason)]).request_outputs
    assert res.finished and res.outputs[0].finish_reason == name and res.outputs[0].stop_reason is None


# ---------------------------------------------------------------------------- logprobs


def test_sample_logprobs(tok: Any) -> None:
    proc = start(tok, SamplingParams(logprobs=2, output_kind=DELTA))
    a, b = enc(tok, "hello")[:2]
    # sampled token is also the top-1, tied with token 90: it keeps its own rank (2, ties count
    # against it) and is not listed twice
    rows1 = LogprobsLists([[a, a, 90]], [[-0.25, -0.25, -0.25]], [2])
    rows2 = LogprobsLists([[b, 90, 91]], [[-3.0, -0.5, -1.0]], [7])
    (r1,) = proc.process_outputs([out("r", [a], new_logprobs=rows1)]).request_outputs
    (r2,) = proc.process_outputs([out("r", [b], FinishReason.LENGTH, new_logprobs=rows2)]).request_outputs
    c1, c2 = r1.outputs[0], r2.outputs[0]
    assert c1.logprobs is not None and c2.logprobs is not None
    assert list(c1.logprobs[0]) == [a, 90] and list(c2.logprobs[0]) == [b, 90, 91]
    assert (c2.logprobs[0][b].logprob, c2.logprobs[0][b].rank) == (-3.0, 7)
    assert [(c2.logprobs[0][t].rank, c2.logprobs[0][t].decoded_token) for t in (90, 91)] == [
        (1, tok.decode([90])),
        (2, tok.decode([91])),
    ]
    assert c1.logprobs[0][a].decoded_token == tok.decode([a]) and c1.logprobs[0][a].rank == 2
    assert c1.logprobs[0][90].rank == 2
    assert c1.cumulative_logprob == pytest.approx(-0.25) and c2.cumulative_logprob == pytest.approx(-3.25)
    proc = start(tok, SamplingParams())
    (res,) = proc.process_outputs([out("r", [a], FinishReason.LENGTH)]).request_outputs
    assert res.outputs[0].logprobs is None and res.outputs[0].cumulative_logprob is None


@pytest.mark.parametrize("kind", [CUM, DELTA])
def test_prompt_logprobs_arrive_in_chunks(tok: Any, kind: RequestOutputKind) -> None:
    prompt = [0, 80, 81, 82, 83]
    proc = start(tok, SamplingParams(prompt_logprobs=1, output_kind=kind), prompt_ids=prompt)
    chunk1 = LogprobsLists([[80, 9], [81, 9]], [[-1.0, -0.1], [-2.0, -0.1]], [3, 4])
    chunk2 = LogprobsLists([[82, 82], [83, 9]], [[-0.3, -0.3], [-4.0, -0.2]], [1, 9])
    assert proc.process_outputs([out("r", [], new_prompt_logprobs=chunk1)]).request_outputs == []
    (r1,) = proc.process_outputs(
        [out("r", [70], new_prompt_logprobs=chunk2, num_cached_tokens=2)]
    ).request_outputs
    (r2,) = proc.process_outputs([out("r", [71], FinishReason.LENGTH)]).request_outputs
    plp = r1.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    assert [next(iter(d)) for d in plp[1:] if d is not None] == prompt[1:]
    assert [d[t].rank for d, t in zip(plp[1:], prompt[1:]) if d is not None] == [3, 4, 1, 9]
    assert plp[3] is not None and list(plp[3]) == [82]  # top-1 equals the prompt token: one entry
    assert r1.num_cached_tokens == 2 and r2.num_cached_tokens == 2
    assert (r2.prompt_logprobs is None) == (kind == DELTA)  # DELTA sends them once


# ---------------------------------------------------------------------------- output kinds, n > 1


def test_output_kinds_single_child(tok: Any) -> None:
    ids = enc(tok, "hello world today")
    for kind, num_outputs in ((CUM, 3), (DELTA, 3), (FINAL, 1)):
        proc = start(tok, SamplingParams(output_kind=kind))
        results = feed(proc, "r", [ids[:2], ids[2:5], ids[5:]], FinishReason.LENGTH)
        assert len(results) == num_outputs
        if kind == DELTA:
            assert [r.outputs[0].token_ids for r in results] == [ids[:2], ids[2:5], ids[5:]]
        else:
            assert results[-1].outputs[0].token_ids == ids
        assert results[-1].outputs[0].finish_reason == "length"
        metrics = results[-1].metrics
        assert (
            metrics is not None and metrics.first_token_time is not None and metrics.finished_time is not None
        )


def test_n_children_aggregate(tok: Any) -> None:
    a, b = enc(tok, "hello"), enc(tok, "world")
    for kind in (CUM, DELTA, FINAL):
        proc = start(tok, SamplingParams(n=2, output_kind=kind, seed=1))
        assert proc.get_num_unfinished_requests() == 1 and proc.has_request("r")
        r1 = proc.process_outputs([out("0_r", a[:2]), out("1_r", b[:1])]).request_outputs
        r2 = proc.process_outputs([out("1_r", b[1:], FinishReason.LENGTH)]).request_outputs
        assert proc.has_unfinished_requests()
        r3 = proc.process_outputs([out("0_r", [*a[2:], EOS], FinishReason.STOP)]).request_outputs
        assert not proc.has_unfinished_requests() and not proc.has_request("r")
        if kind == FINAL:
            assert r1 == r2 == [] and len(r3) == 1
        else:
            assert len(r1) == len(r2) == len(r3) == 1  # one RequestOutput per parent and step
            assert [c.index for c in r1[0].outputs] == [0, 1]
            assert [c.index for c in r2[0].outputs] == ([1] if kind == DELTA else [0, 1])
            assert not r1[0].finished and not r2[0].finished
        final = r3[0]
        assert final.finished and final.request_id == "r"
        if kind != DELTA:
            assert [(c.index, c.text, c.finish_reason) for c in final.outputs] == [
                (0, "hello", "stop"),
                (1, "world", "length"),
            ]


def test_abort_requests(tok: Any) -> None:
    proc = start(tok, SamplingParams(n=3, seed=0))
    proc.process_outputs([out("1_r", [80], FinishReason.LENGTH)])
    assert sorted(proc.abort_requests(["r", "unknown"])) == ["0_r", "2_r"]
    assert not proc.has_unfinished_requests() and proc.abort_requests(["r"]) == []
    assert proc.process_outputs([out("0_r", [80])]).request_outputs == []


def test_add_request_validation(tok: Any) -> None:
    proc = start(tok, SamplingParams())
    with pytest.raises(ValueError, match="already running"):
        proc.add_request("r", None, [0], SamplingParams(), ["r"], 0.0)
    with pytest.raises(ValueError, match="child_ids must have n=2 entries"):
        proc.add_request("s", None, [0], SamplingParams(n=2), ["s"], 0.0)
