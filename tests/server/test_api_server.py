"""End-to-end: a real uvicorn server (engine in its own process) driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pagedserve import SamplingParams
from pagedserve.entrypoints.cli import main as cli_main
from pagedserve.ops.audit_verify import verify_audit_log
from tests.server.conftest import MAX_MODEL_LEN, RunningServer

PROMPTS = ["the model runs", "a cat sees the river", "every request finds a block", "one two three"]
MAX_TOKENS = 8


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def greedy(llm: Any, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} {labels} not found")


def test_models_version_health(api_server: RunningServer) -> None:
    models = client(api_server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(api_server.base_url + "/version").json()["version"]
    assert httpx.get(api_server.base_url + "/health").status_code == 200


def test_completions_equal_offline_greedy(api_server: RunningServer, offline_llm: Any) -> None:
    expected = greedy(offline_llm, PROMPTS)
    c = client(api_server)
    # one request per prompt, and the whole batch in one request (choices in prompt order)
    for prompt, want in zip(PROMPTS, expected):
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == want
        assert r.usage.completion_tokens == MAX_TOKENS or r.choices[0].finish_reason == "stop"
    batch = c.completions.create(model="tiny", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert [ch.text for ch in sorted(batch.choices, key=lambda ch: ch.index)] == expected
    # streaming deltas concatenate to the same text; usage comes last when asked for
    stream = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                  stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected[0]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(offline_llm.get_tokenizer().encode(PROMPTS[0]))


def test_continuous_usage_stats(api_server: RunningServer) -> None:
    """vLLM's stream_options.continuous_usage_stats: the usage so far on every chunk."""
    c = client(api_server)
    options = {"include_usage": True, "continuous_usage_stats": True}
    for create, kwargs in ((c.completions.create, {"prompt": PROMPTS[0]}),
                           (c.chat.completions.create, {"messages": [{"role": "user", "content": PROMPTS[0]}]})):
        chunks = list(create(model="tiny", max_tokens=MAX_TOKENS, temperature=0, stream=True,
                             stream_options=options, extra_body={"ignore_eos": True}, **kwargs))
        assert all(ch.usage is not None for ch in chunks)
        completion = [ch.usage.completion_tokens for ch in chunks]
        assert completion == sorted(completion) and completion[-1] == MAX_TOKENS
        assert all(ch.usage.total_tokens == ch.usage.prompt_tokens + ch.usage.completion_tokens for ch in chunks)
        assert chunks[-1].choices == [] and chunks[0].usage.prompt_tokens > 0
    plain = list(c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, stream=True,
                                      stream_options={"include_usage": True}))
    assert [ch.usage is not None for ch in plain] == [False] * (len(plain) - 1) + [True]


def test_completion_token_prompt_echo_logprobs_n(api_server: RunningServer, offline_llm: Any) -> None:
    tok = offline_llm.get_tokenizer()
    ids = tok.encode(PROMPTS[1])
    want = greedy(offline_llm, [PROMPTS[1]])[0]
    c = client(api_server)
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=MAX_TOKENS, temperature=0, echo=True,
                             logprobs=2, n=2)  # fmt: skip
    assert len(r.choices) == 2
    for ch in r.choices:
        assert ch.text == tok.decode(ids) + want
        lp = ch.logprobs
        assert lp is not None and len(lp.tokens) == len(ids) + MAX_TOKENS
        assert lp.token_logprobs[0] is None  # nothing predicts the first prompt token
        assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
        # greedy: the chosen token is the most likely one (top lists are keyed by text, so two
        # tokens with the same text share an entry: compare with <=)
        for top, chosen in zip(lp.top_logprobs[len(ids) :], lp.token_logprobs[len(ids) :]):
            assert top is not None and 1 <= len(top) <= 2
            assert chosen is not None and max(top.values()) <= chosen + 1e-5


def test_stop_and_seed(api_server: RunningServer, offline_llm: Any) -> None:
    c = client(api_server)
    full = greedy(offline_llm, [PROMPTS[0]], 16)[0]
    stop = full[3:5]
    r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[: full.index(stop)]
    seeded = [
        c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7).choices[0].text
        for _ in range(2)
    ]  # fmt: skip
    assert seeded[0] == seeded[1]


def test_chat_equals_offline_chat(api_server: RunningServer, offline_llm: Any) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat runs"}]
    want = offline_llm.chat(messages, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    want_text = want[0].outputs[0].text
    c = client(api_server)
    r = c.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                  temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want_text
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(e.top_logprobs) == 3 for e in content)
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                       temperature=0, stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want_text
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [want[0].outputs[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(
        want[0].outputs[0].token_ids
    )
    # vLLM extras through extra_body
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0.8,  # type: ignore[arg-type]
                                  extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
                                              "ignore_eos": True})  # fmt: skip
    assert r.usage.completion_tokens == 4  # type: ignore[union-attr]


def test_sse_wire_format(api_server: RunningServer) -> None:
    body = {"model": "tiny", "prompt": "the", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", api_server.v1 + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_openai_errors(api_server: RunningServer) -> None:
    c = client(api_server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=MAX_MODEL_LEN)
    assert "maximum context length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="the " * (MAX_MODEL_LEN + 10), max_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"  # type: ignore[index]
    tok = httpx.post(api_server.base_url + "/tokenize", json={"prompt": "the cat"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == MAX_MODEL_LEN
    detok = httpx.post(api_server.base_url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"].endswith("the cat")


async def _stream_one(http: httpx.AsyncClient, url: str, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    text = ""
    async with http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_200_concurrent_streams(api_server: RunningServer, offline_llm: Any) -> None:
    expected = dict(zip(PROMPTS, greedy(offline_llm, PROMPTS, 4)))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(200)]

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=180, limits=limits) as http:
            url = api_server.v1 + "/completions"
            return await asyncio.gather(*[_stream_one(http, url, p) for p in prompts])

    results = asyncio.run(run())
    assert results == [expected[p] for p in prompts]


def test_disconnect_aborts_and_frees_kv(api_server: RunningServer) -> None:
    metrics_url = api_server.base_url + "/metrics"
    aborted_before = metric(
        httpx.get(metrics_url).text, "vllm:request_success_total", 'finished_reason="abort"'
    )

    async def hang_up(http: httpx.AsyncClient) -> None:
        body = {"model": "tiny", "prompt": "the model", "max_tokens": 240, "ignore_eos": True, "stream": True,
                "n": 4}  # fmt: skip
        async with http.stream("POST", api_server.v1 + "/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    break  # got the first tokens: walk away mid-stream

    async def give_up(http: httpx.AsyncClient) -> None:  # a non-streaming client that times out
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 240, "ignore_eos": True, "n": 4}
        with pytest.raises(httpx.ReadTimeout):
            await http.post(api_server.v1 + "/completions", json=body, timeout=0.3)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            await asyncio.gather(*[hang_up(http) for _ in range(6)], give_up(http))

    asyncio.run(run())
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(metrics_url).text
        aborted = metric(text, "vllm:request_success_total", 'finished_reason="abort"') - aborted_before
        usage = metric(text, "vllm:kv_cache_usage_perc")
        if (
            aborted >= 6 and usage == 0.0 and metric(text, "vllm:num_requests_running") == 0
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert aborted >= 7
    assert usage == 0.0
    assert metric(text, "vllm:num_requests_running") == 0


def test_fuzz_routes_no_5xx(api_server: RunningServer) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 40), st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=12),
    )  # fmt: skip
    values = st.one_of(
        scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=5), scalars, max_size=3)
    )
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bogus"]),
                                     "content": st.one_of(st.text(max_size=20), values)})  # fmt: skip
    fields = {
        "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "logprobs",
                            "echo", "seed", "top_k", "min_p", "stream", "stream_options", "logit_bias",
                            "min_tokens", "stop_token_ids", "prompt_logprobs", "best_of"],
        "/v1/chat/completions": ["model", "messages", "max_tokens", "max_completion_tokens", "logprobs",
                                 "top_logprobs", "n", "temperature", "stream", "stop", "tools", "tool_choice",
                                 "continue_final_message", "add_generation_prompt", "response_format"],
        "/tokenize": ["prompt", "messages", "add_special_tokens", "model"],
        "/detokenize": ["tokens", "model"],
    }  # fmt: skip
    good_defaults: dict[str, dict[str, Any]] = {
        "/v1/completions": {"prompt": "the cat", "max_tokens": 3},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        "/tokenize": {"prompt": "hi"},
        "/detokenize": {"tokens": [5, 6]},
    }

    @st.composite
    def request_body(draw: Any) -> tuple[str, Any]:
        route = draw(st.sampled_from(sorted(fields)))
        if draw(st.integers(0, 9)) == 0:
            return route, draw(st.one_of(st.text(max_size=20), values))  # not an object at all
        body = dict(good_defaults[route]) if draw(st.booleans()) else {}
        for name in draw(st.lists(st.sampled_from(fields[route]), max_size=4, unique=True)):
            body[name] = draw(st.lists(message, min_size=0, max_size=2) if name == "messages" else values)
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 16:
            body["max_tokens"] = 16  # keep generation short; bounds are fuzzed by the small ints
        if isinstance(body.get("n"), int) and body["n"] > 4:
            body["n"] = 4
        return route, body

    http = httpx.Client(base_url=api_server.base_url, timeout=60)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request_body())
    def check(case: tuple[str, Any]) -> None:
        route, body = case
        r = http.post(route, content=json.dumps(body))
        assert r.status_code < 500, (route, body, r.status_code, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    garbage = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert garbage.status_code == 400
    http.close()


def test_audit_chain_verifies_and_cli_finds_edit(api_server: RunningServer, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    c = client(api_server)
    for p in PROMPTS[:3]:
        c.completions.create(model="tiny", prompt=p, max_tokens=2)
    assert api_server.audit_path is not None
    copy = tmp_path / "audit.jsonl"
    shutil.copy(api_server.audit_path, copy)
    result = verify_audit_log(copy)
    assert result.ok and result.lines_checked >= 3
    lines = copy.read_text().splitlines()
    first = json.loads(lines[0])
    assert first["model"] == "tiny" and first["status"] in ("ok", "aborted", "error", "rejected")
    assert "the" not in json.dumps({k: v for k, v in first.items() if k != "model"})  # no text, only hashes
    assert cli_main(["audit", "verify", str(copy)]) == 0
    lines[1] = re.sub(r'"completion_tokens":\d+', '"completion_tokens":999', lines[1])
    copy.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert cli_main(["audit", "verify", str(copy)]) == 1
    assert "line 2" in capsys.readouterr().out


def test_metrics_exposed(api_server: RunningServer) -> None:
    client(api_server).completions.create(model="tiny", prompt="the cat", max_tokens=3, temperature=0)
    text = httpx.get(api_server.base_url + "/metrics").text
    assert metric(text, "vllm:prompt_tokens_total", 'model_name="tiny"') > 0
    assert metric(text, "vllm:generation_tokens_total", 'model_name="tiny"') >= 3
    assert metric(text, "vllm:request_success_total", 'finished_reason="length"') >= 1
    assert metric(text, "vllm:time_to_first_token_seconds_count", 'model_name="tiny"') >= 1
    assert metric(text, "vllm:iteration_tokens_total_count", 'model_name="tiny"') >= 1
    assert metric(text, "vllm:request_queue_time_seconds_count", 'model_name="tiny"') >= 1
    assert metric(text, "http_requests_total", 'handler="/v1/completions"') >= 1
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_swapped", "vllm:prefix_cache_queries_total",
                 "vllm:num_preemptions_total", "vllm:e2e_request_latency_seconds_bucket"):  # fmt: skip
        assert name + "{" in text
