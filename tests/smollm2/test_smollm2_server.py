"""`pagedserve serve` with no model serves SmolLM2-135M-Instruct: the README's first minute (the
France question through the openai SDK), and the requests lm-evaluation-harness's
`local-completions` model sends (loglikelihood through echo + logprobs, generate_until with stop),
checked against transformers loading the same GGUF."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from pagedserve.builtin_model import SMOLLM2_NAME
from pagedserve.testing.real_text import FRANCE_QUESTION, PARAGRAPH
from tests.server.conftest import RunningServer, free_port, stop_process, wait_healthy
from tests.smollm2.conftest import hf_logprobs

STARTUP_TIMEOUT_S = 900.0  # first start converts the GGUF metadata; 2 shared CPU cores


@pytest.fixture(scope="module")
def builtin_server(smollm2_file: str, smollm2_cache: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    port = free_port()
    drop = ("PAGEDSERVE_BUILTIN_MODEL", "VLLM_API_KEY", "PAGEDSERVE_API_KEYS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PAGEDSERVE_CACHE"] = smollm2_cache
    # `pagedserve serve` as the README runs it (no model), with float32 and a small KV cache
    args = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--dtype", "float32", "--max-model-len", "1024",
            "--kv-cache-memory-bytes", str(64 << 20), "--log-format", "text"]  # fmt: skip
    log_path = tmp_path_factory.mktemp("smollm2_server") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess_popen(args, log, env)
    server = RunningServer(proc, f"http://127.0.0.1:{port}", SMOLLM2_NAME, log_path)
    try:
        wait_healthy(server, timeout_s=STARTUP_TIMEOUT_S)
        yield server
    finally:
        stop_process(proc)


def subprocess_popen(args: list[str], log: Any, env: dict[str, str]) -> Any:
    import subprocess

    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)


def test_serve_without_a_model_answers_the_france_question(builtin_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=builtin_server.v1, api_key="unused", http_client=httpx.Client(timeout=300))
    assert [m.id for m in client.models.list().data] == [SMOLLM2_NAME]
    chat = client.chat.completions.create(model=SMOLLM2_NAME, messages=[{"role": "user", "content": FRANCE_QUESTION}],
                                          max_tokens=24, temperature=0)
    answer = chat.choices[0].message.content or ""
    assert "Paris" in answer, answer
    assert chat.choices[0].finish_reason == "stop"  # ended on the template's <|im_end|>


PAIRS = [("The capital of France is", " Paris."), ("Water boils at a temperature of", " 100 degrees Celsius"),
         (PARAGRAPH[:120], PARAGRAPH[120:260]), ("Question: What color is the sky?\nAnswer:", " Blue")]


def _encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: the whole string's tokens, the context's tokens taken off the front."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


@pytest.mark.parametrize("max_tokens", [0, 1])  # lm-eval's documented 0; its recent releases send 1
def test_lm_eval_loglikelihood_requests(builtin_server: RunningServer, hf_smollm2: tuple[Any, Any],
                                        max_tokens: int) -> None:
    model, tok = hf_smollm2
    pairs = [_encode_pair(tok, c, x) for c, x in PAIRS]
    payload = {"model": SMOLLM2_NAME, "prompt": [ctx + cont for ctx, cont in pairs], "temperature": 0,
               "max_tokens": max_tokens, "logprobs": 1, "seed": 1234, "echo": True}
    resp = httpx.post(builtin_server.v1 + "/completions", json=payload, timeout=300)
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == len(pairs)
    for choice, (ctx, cont) in zip(choices, pairs):
        lp = choice["logprobs"]
        n = len(ctx) + len(cont)
        assert len(lp["token_logprobs"]) == n + max_tokens
        assert lp["token_logprobs"][0] is None
        # lm-eval's parse_logprobs: the continuation's slice (without the sampled token, if any)
        end = n
        ours = lp["token_logprobs"][len(ctx):end]
        tops = lp["top_logprobs"][len(ctx):end]
        is_greedy = all(t == max(top.values()) for t, top in zip(ours, tops))
        ref = hf_logprobs(model, ctx + cont)
        theirs = [ref[len(ctx) + i - 1, t].item() for i, t in enumerate(cont)]
        assert abs(sum(ours) - sum(theirs)) < 1e-3 * len(cont)
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3
        hf_greedy = all(ref[len(ctx) + i - 1].argmax().item() == t for i, t in enumerate(cont))
        assert is_greedy == hf_greedy


def test_lm_eval_generate_until_with_stop(builtin_server: RunningServer, hf_smollm2: tuple[Any, Any]) -> None:
    model, tok = hf_smollm2
    prompts = ["Question: Why is the sky blue?\nAnswer:", "List three fruits:\n1.", "The capital of Italy is"]
    stop = ["\n", "Question:", tok.eos_token]  # lm-eval's `until` plus the EOS text it appends
    payload = {"model": SMOLLM2_NAME, "prompt": [tok(p, add_special_tokens=False).input_ids for p in prompts],
               "max_tokens": 32, "temperature": 0, "stop": stop, "seed": 1234}
    resp = httpx.post(builtin_server.v1 + "/completions", json=payload, timeout=300)
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    for choice, prompt in zip(choices, prompts):
        ids = tok(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, len(ids):], skip_special_tokens=False)
        cut = min([text.find(s) for s in stop if s in text] or [len(text)])
        assert choice["text"] == text[:cut], (prompt, text)
        assert choice["finish_reason"] == ("stop" if cut < len(text) else "length")
