"""Each validation rule of a request runs exactly once, wherever the request enters: the offline
engine (LLMEngine.add_request) and the HTTP routes (the app in this process, its engine in-process).
A counting spy wraps every rule of the engine boundary (RequestBuilder) and SamplingParams' own."""

from __future__ import annotations

import pickle
import time
from collections import Counter
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pagedserve import EngineArgs, LLMEngine, SamplingParams
from pagedserve.engine.request_builder import RequestBuilder
from pagedserve.entrypoints.openai.api_server import build_app
from pagedserve.entrypoints.openai.cli_args import parse_args
from pagedserve.sampling_params import SamplingParamsError
from tests.server.conftest import ENGINE_FLAGS, ENGINE_KWARGS

RULES = ("prepare_prompt", "check_prompt", "check_params")


def _spy(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    counts: Counter[str] = Counter()
    for name in RULES:
        real = getattr(RequestBuilder, name)

        def counting(self: Any, *args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(RequestBuilder, name, counting)
    real_verify = SamplingParams._verify

    def verify(self: SamplingParams) -> None:
        counts["SamplingParams._verify"] += 1
        real_verify(self)

    monkeypatch.setattr(SamplingParams, "_verify", verify)
    return counts


def test_offline_request_is_validated_once(tiny_checkpoints: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_checkpoints["llama"], **ENGINE_KWARGS))
    params = SamplingParams(n=3, temperature=0.0, max_tokens=2, truncate_prompt_tokens=2)
    counts = _spy(monkeypatch)
    engine.add_request("r", [5, 6, 7, 8], params)
    assert dict(counts) == {"prepare_prompt": 1, "check_prompt": 1, "check_params": 1}
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert finished[0].prompt_token_ids == [7, 8]  # truncated once, to the last 2 tokens
    assert dict(counts) == {"prepare_prompt": 1, "check_prompt": 1, "check_params": 1}  # none while stepping


def test_http_request_is_validated_once(tiny_checkpoints: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse_args(["--model", tiny_checkpoints["llama"], "--served-model-name", "tiny", *ENGINE_FLAGS])
    args.engine_in_process = True  # the engine core in this process: the spy sees every rule
    with TestClient(build_app(args)) as http:
        deadline = time.monotonic() + 120
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.2)
        counts = _spy(monkeypatch)
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": ["the cat", "a dog runs"], "n": 2,
                                                "max_tokens": 2, "truncate_prompt_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 4  # each prompt truncated once, to 2 tokens
        # one of each rule per prompt (two prompts), SamplingParams built once per prompt
        assert dict(counts) == {"prepare_prompt": 2, "check_prompt": 2, "check_params": 2,
                                "SamplingParams._verify": 2}
        counts.clear()
        r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "stream": True,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert dict(counts) == {"prepare_prompt": 1, "check_prompt": 1, "check_params": 1,
                                "SamplingParams._verify": 1}
        counts.clear()
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": [[1, 99999]], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert counts["check_prompt"] == 1 and counts["check_params"] == 0  # refused at the first rule
        counts.clear()  # min_tokens past the default max_tokens (what fits): SamplingParams' one rule
        r = http.post("/v1/chat/completions", json={"model": "tiny", "min_tokens": 10_000,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
        assert counts["SamplingParams._verify"] == 1 and counts["check_params"] == 0


def test_sampling_params_errors_name_their_field() -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(max_tokens=2, min_tokens=5)
    assert e.value.param == "min_tokens" and isinstance(e.value, ValueError)
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(logit_bias={3: float("nan")})
    assert e.value.param == "logit_bias"
    back = pickle.loads(pickle.dumps(e.value))
    assert (back.param, str(back)) == ("logit_bias", str(e.value))
