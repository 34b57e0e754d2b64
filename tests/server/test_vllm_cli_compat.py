"""vLLM `serve` command lines as written in vLLM's docs and common deployments parse unchanged;
flags for features we lack fail at start naming the flag ("not supported yet"), never as
"unrecognized arguments"; and a real server starts with many of these flags."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pagedserve.entrypoints.openai.cli_args import add_server_args, engine_args_from, validate_args
from tests.server.conftest import RunningServer, start_server

QWEN_TOOLS = ("vllm serve Qwen/Qwen2.5-7B-Instruct --enable-auto-tool-choice --tool-call-parser hermes "
              "--dtype bf16 --max-model-len 8192 --disable-log-requests")  # fmt: skip
GOOD = [
    QWEN_TOOLS,
    "vllm serve meta-llama/Llama-3.1-8B-Instruct --enable-auto-tool-choice --tool-call-parser llama3_json "
    "--chat-template examples/tool_chat_template_llama3.1_json.jinja",
    "vllm serve meta-llama/Llama-3.2-3B-Instruct --enable-auto-tool-choice --tool-call-parser pythonic "
    "--chat-template examples/tool_chat_template_llama3.2_pythonic.jinja",
    "vllm serve deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --reasoning-parser deepseek_r1",
    "vllm serve Qwen/Qwen3-8B --reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser hermes",
    "vllm serve NousResearch/Meta-Llama-3-8B-Instruct --dtype auto --api-key token-abc123",
    "vllm serve mistralai/Mistral-7B-Instruct-v0.3 --enable-auto-tool-choice --tool-call-parser mistral "
    "--dtype fp16 --config-format hf --load-format safetensors",
    "vllm serve Qwen/Qwen2.5-1.5B-Instruct --host 0.0.0.0 --port 8000 --gpu-memory-utilization 0.95 "
    "--max-num-seqs 128 --enable-prefix-caching --enable-chunked-prefill --max-num-batched-tokens 4096 "
    "--trust-remote-code --download-dir /models --revision main --disable-log-stats --uvicorn-log-level info "
    "--served-model-name my-model --swap-space 8 --seed 42 --kv-cache-dtype auto --load-format auto",
    "vllm serve facebook/opt-125m --tensor-parallel-size 1 --pipeline-parallel-size 1 "
    "--distributed-executor-backend mp --max-seq-len-to-capture 8192 --guided-decoding-backend xgrammar "
    "--response-role assistant --chat-template-content-format string --max-log-len 100 --enable-log-requests "
    "--tokenizer-mode auto --tokenizer-revision v1 --cpu-offload-gb 0 --dtype=bfloat16 "
    "--middleware starlette.middleware.gzip.GZipMiddleware",
    "vllm serve facebook/opt-125m --enable-chunked-prefill=False --distributed-executor-backend uni -pp 1",
    "vllm serve facebook/opt-125m --no-enable-chunked-prefill --load-format pt --dtype half",
]
# (command line, text the error must hold)
NOT_SUPPORTED = [
    ("vllm serve meta-llama/Llama-2-7b-hf --enable-lora --lora-modules sql-lora=/adapters/sql", "--enable-lora"),
    ("vllm serve m --lora-modules sql-lora=/adapters/sql", "--lora-modules"),
    ("vllm serve m --cpu-offload-gb 10", "--cpu-offload-gb > 0"),
    ("vllm serve m --pipeline-parallel-size 2 --distributed-executor-backend ray", "--pipeline-parallel-size > 1"),
    ("vllm serve m -tp 2 --distributed-executor-backend ray", "--distributed-executor-backend ray"),
    ("vllm serve m --kv-cache-dtype fp8", "--kv-cache-dtype fp8"),
    ("vllm serve m --load-format gguf", "--load-format gguf"),
    ("vllm serve m --load-format bitsandbytes", "--load-format bitsandbytes"),
    ("vllm serve mistralai/Mistral-7B-Instruct-v0.3 --tokenizer-mode mistral --load-format mistral "
     "--config-format mistral --enable-auto-tool-choice --tool-call-parser mistral", "--load-format mistral"),
    ("vllm serve m --tokenizer-mode mistral", "--tokenizer-mode mistral"),
    ("vllm serve m --config-format mistral", "--config-format mistral"),
    ("vllm serve m --guided-decoding-backend outlines", "--guided-decoding-backend outlines"),
    ("vllm serve m --enable-auto-tool-choice --tool-call-parser granite", "--tool-call-parser 'granite'"),
    ("vllm serve m --reasoning-parser granite", "--reasoning-parser 'granite'"),
    ("vllm serve m --tool-parser-plugin my_parsers.py --tool-call-parser mine", "--tool-parser-plugin"),
]
FAILS = [
    ("vllm serve m --enable-auto-tool-choice", "--enable-auto-tool-choice requires --tool-call-parser"),
    ("vllm serve m --middleware no_such_module_xyz.Middleware", "--middleware 'no_such_module_xyz.Middleware'"),
    ("vllm serve m --enable-chunked-prefill maybe", "expected true or false"),
]


def _parse(command: str) -> argparse.Namespace:
    """`vllm serve ...` through `pagedserve serve`'s parser (the model may be positional)."""
    argv = shlex.split(command)
    assert argv[:2] == ["vllm", "serve"]
    parser = argparse.ArgumentParser(prog="pagedserve serve", allow_abbrev=False)
    add_server_args(parser, positional_model=True)
    args = parser.parse_args(argv[2:])
    validate_args(parser, args)
    return args


@pytest.mark.parametrize("command", GOOD)
def test_vllm_command_lines_parse(command: str) -> None:
    args = _parse(command)
    assert args.model == shlex.split(command)[2]
    engine_args_from(args)  # every value maps onto EngineArgs


def test_parsed_values() -> None:
    args = _parse(QWEN_TOOLS)
    assert (args.dtype, args.max_model_len, args.enable_log_requests) == ("bfloat16", 8192, False)
    assert (args.enable_auto_tool_choice, args.tool_call_parser) == (True, "hermes")
    args = _parse(GOOD[7])
    e = engine_args_from(args)
    assert (e.trust_remote_code, e.download_dir, e.revision, e.load_format) == (True, "/models", "main", "auto")
    assert e.enable_chunked_prefill and args.disable_log_stats and args.enable_prefix_caching
    args = _parse(GOOD[8])
    assert (args.enable_log_requests, args.max_log_len, args.chat_template_content_format) == (True, 100, "string")
    assert engine_args_from(args).tokenizer_revision == "v1"
    assert not engine_args_from(_parse(GOOD[9])).enable_chunked_prefill
    e = engine_args_from(_parse(GOOD[10]))
    assert (e.enable_chunked_prefill, e.load_format, e.dtype) == (False, "pt", "half")


def _fails(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        _parse(command)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err
    return err


@pytest.mark.parametrize(("command", "named"), NOT_SUPPORTED)
def test_missing_features_fail_naming_the_flag(command: str, named: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(command, capsys)
    assert named in err and "is not supported yet" in err, err


@pytest.mark.parametrize(("command", "named"), FAILS)
def test_bad_values_fail_clearly(command: str, named: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert named in _fails(command, capsys)


def test_no_chunked_prefill_schedules_prompts_whole(tiny_checkpoints: Any) -> None:
    on = engine_args_from(_parse(f"vllm serve {tiny_checkpoints['llama']} --max-model-len 256 "
                                 "--max-num-batched-tokens 64")).create_engine_config()  # fmt: skip
    assert on.scheduler_config.enable_chunked_prefill and on.scheduler_config.max_num_batched_tokens == 64
    off = engine_args_from(_parse(f"vllm serve {tiny_checkpoints['llama']} --max-model-len 256 "
                                  "--no-enable-chunked-prefill")).create_engine_config()  # fmt: skip
    assert not off.scheduler_config.enable_chunked_prefill
    assert off.scheduler_config.max_num_batched_tokens >= 256
    with pytest.raises(ValueError, match="without chunked prefill a prompt could never be scheduled"):
        engine_args_from(_parse(f"vllm serve {tiny_checkpoints['llama']} --max-model-len 256 "
                                "--no-enable-chunked-prefill --max-num-batched-tokens 64")).create_engine_config()


MIDDLEWARE = '''
from starlette.middleware.base import BaseHTTPMiddleware


class AddHeader(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        response = await call_next(request)
        response.headers["x-compat-class"] = "1"
        return response


async def add_header(request, call_next):
    response = await call_next(request)
    response.headers["x-compat-function"] = "1"
    return response
'''


def _chat(server: Any, **body: Any) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Paris please XYZZY"}],
            "max_tokens": 4, **body}  # fmt: skip
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def compat_server(tiny_checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Logging switches, loading flags, chat options, auto tool calls (hermes), the qwen3
    reasoning parser and two --middleware, on one real server."""
    tmp_path = tmp_path_factory.mktemp("compat_server")
    (tmp_path / "compat_mw.py").write_text(MIDDLEWARE)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PAGEDSERVE_LOG_STATS_INTERVAL": "0"}  # fmt: skip
    flags = ["--enable-log-requests", "--max-log-len", "20", "--trust-remote-code", "--load-format", "safetensors",
             "--kv-cache-dtype", "auto", "--enable-chunked-prefill", "--response-role", "bot",
             "--chat-template-content-format", "openai", "--guided-decoding-backend", "xgrammar",
             "--distributed-executor-backend", "mp", "--pipeline-parallel-size", "1", "--max-seq-len-to-capture",
             "1024", "--tokenizer-mode", "auto", "--dtype", "fp32", "--log-format", "text",
             "--middleware", "compat_mw.AddHeader", "--middleware", "compat_mw.add_header",
             "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]  # fmt: skip
    with start_server(tiny_checkpoints["llama"], tmp_path, extra=flags, env=env) as server:
        yield server


def test_server_starts_with_vllm_flags(compat_server: RunningServer) -> None:
    server = compat_server
    r = _chat(server)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "bot"
    assert r.headers["x-compat-class"] == "1" and r.headers["x-compat-function"] == "1"
    chunks = _stream_chunks(server, max_tokens=4)
    assert chunks[0]["choices"][0]["delta"]["role"] == "bot"
    log = server.log()
    # --enable-log-requests with --max-log-len 20: the prompt is logged, cut to 20 characters
    assert "Received request chatcmpl-" in log and "Weather" in log and "XYZZY" not in log
    assert "Running: 0 reqs" in log or "Running: 1 reqs" in log  # stats logging is on by default


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
# The tiny model has random weights: structured outputs force it to write a hermes tool call
# after some reasoning and content (byte-level BPE: any text is tokenizable).
SCRIPTED = ('<think>The user asks.</think>Checking.<tool_call>{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}</tool_call>')


def test_auto_tool_choice_end_to_end(compat_server: RunningServer) -> None:
    body = {"tools": [WEATHER_TOOL], "tool_choice": "auto", "guided_regex": re.escape(SCRIPTED), "max_tokens": 150}
    r = _chat(compat_server, **body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["reasoning_content"] == message["reasoning"] == "The user asks."
    assert message["content"] == "Checking."
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    chunks = _stream_chunks(compat_server, **body)
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    reasoning = "".join(d["delta"].get("reasoning_content", "") for d in deltas)
    content = "".join(d["delta"].get("content", "") for d in deltas)
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls", [])]
    assert (reasoning, content) == ("The user asks.", "Checking.")
    first = calls[0]
    assert (first["index"], first["type"], first["function"]["name"]) == (0, "function", "get_weather")
    assert first["id"] and all(tc.get("id") is None and tc["index"] == 0 for tc in calls[1:])
    assert json.loads("".join(tc["function"].get("arguments") or "" for tc in calls)) == {"city": "Paris"}
    assert deltas[-1]["finish_reason"] == "tool_calls"
    # content deltas all come before the call's deltas
    last_content = max(i for i, d in enumerate(deltas) if d["delta"].get("content"))
    assert last_content < min(i for i, d in enumerate(deltas) if d["delta"].get("tool_calls"))

    # tool_choice "none": no parsing; no tools: no parsing (the reasoning parser still applies)
    for extra in ({"tool_choice": "none"}, {"tools": None, "tool_choice": None}):
        r = _chat(compat_server, **{**body, **extra})
        message = r.json()["choices"][0]["message"]
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        assert not message.get("tool_calls") and message["content"].startswith("Checking.<tool_call>")
        assert message["reasoning_content"] == "The user asks."


def _stream_chunks(server: Any, **body: Any) -> list[dict[str, Any]]:
    out = []
    with httpx.stream("POST", server.v1 + "/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, **body,
    }) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def test_logging_off(tiny_checkpoints: Any, tmp_path: Path) -> None:
    flags = ["--disable-log-requests", "--disable-log-stats", "--log-format", "text"]
    with start_server(tiny_checkpoints["llama"], tmp_path, extra=flags,
                      env={"PAGEDSERVE_LOG_STATS_INTERVAL": "0"}) as server:  # fmt: skip
        assert _chat(server).status_code == 200
        # "auto" without the tool flags: a 400 naming them, as vLLM
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        r = _chat(server, tools=tools, tool_choice="auto")
        assert r.status_code == 400 and "--enable-auto-tool-choice" in r.json()["error"]["message"]
        log = server.log()
    assert "Received request" not in log and "Running:" not in log


def test_async_scheduling_is_on_offline_off_in_the_server_and_both_can_be_switched() -> None:
    from pagedserve import EngineArgs
    from pagedserve.entrypoints.config_file import config_tokens

    assert EngineArgs(model="m").async_scheduling
    assert not EngineArgs(model="m", async_scheduling=False).async_scheduling
    assert not engine_args_from(_parse("vllm serve m")).async_scheduling
    assert engine_args_from(_parse("vllm serve m --async-scheduling")).async_scheduling
    assert not engine_args_from(_parse("vllm serve m --no-async-scheduling")).async_scheduling
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_server_args(parser, positional_model=True)
    # a --config YAML says it as vLLM's does: a boolean under the flag's name
    assert config_tokens(parser, {"async-scheduling": False}, set()) == ["--no-async-scheduling"]
    assert config_tokens(parser, {"async_scheduling": True}, set()) == ["--async-scheduling"]
