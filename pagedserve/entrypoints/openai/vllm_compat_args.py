"""vLLM `serve` flags beyond the core set, so that existing vLLM command lines start unchanged.

Each flag either works, or is accepted because it has nothing to change here, or (a feature we
lack) fails at start naming the flag and saying it is not supported yet; never "unrecognized
arguments". Wired from cli_args.add_server_args / validate_args / engine_args_from.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from pagedserve.config import LOAD_FORMATS
from pagedserve.entrypoints.arg_types import non_negative_float, non_negative_int, positive_int

# vLLM's dtype spellings -> ours (argparse applies `type` before checking `choices`).
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "f16": "float16", "f32": "float32"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _dtype(text: str) -> str:
    key = text.strip().lower()
    return _DTYPE_ALIASES.get(key, key)


def _bool(text: str) -> bool:
    key = text.strip().lower()
    if key in _TRUE:
        return True
    if key in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_vllm_compat_args(parser: argparse.ArgumentParser) -> None:
    from pagedserve.entrypoints.openai.reasoning_parsers import reasoning_parser_names
    from pagedserve.entrypoints.openai.tool_parsers import tool_parser_names

    g = parser.add_argument_group("vLLM compatibility")
    # Logging
    g.add_argument("--enable-log-requests", dest="enable_log_requests", action="store_true", default=False,
                   help="log each request's prompt, token ids and sampling params (INFO)")  # fmt: skip
    g.add_argument("--disable-log-requests", dest="enable_log_requests", action="store_false",
                   help="do not log requests (the default; kept for older vLLM command lines)")  # fmt: skip
    g.add_argument("--max-log-len", type=non_negative_int, default=None,
                   help="logged prompts are cut to this many characters / token ids (default: all)")  # fmt: skip
    g.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic engine stats log line (the /metrics endpoint is unaffected)")  # fmt: skip
    # Model location and loading
    g.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the checkpoint's own config/tokenizer code")  # fmt: skip
    g.add_argument("--revision", default=None, help="hub branch, tag or commit of the model")
    g.add_argument("--tokenizer-revision", default=None, help="hub revision of the tokenizer")
    g.add_argument("--download-dir", default=None, help="where hub snapshots are stored (default: HF cache)")
    g.add_argument("--load-format", default="auto",
                   help="auto (safetensors, else PyTorch .bin), safetensors or pt")  # fmt: skip
    g.add_argument("--tokenizer-mode", default="auto", help="auto or hf (a transformers tokenizer)")
    g.add_argument("--config-format", default="auto", help="auto or hf (config.json)")
    g.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype)")
    g.add_argument("--max-seq-len-to-capture", type=positive_int, default=None,
                   help="accepted; decode CUDA graphs here cover every sequence length")  # fmt: skip
    g.add_argument("--enable-chunked-prefill", dest="enable_chunked_prefill", nargs="?", const=True,
                   type=_bool, default=True,
                   help="split long prompts across steps (default on; --no-enable-chunked-prefill: "
                        "each prompt is scheduled whole)")  # fmt: skip
    g.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--guided-decoding-backend", default="auto", help="auto or xgrammar")
    # Parallelism and offload
    g.add_argument("--pipeline-parallel-size", "-pp", type=positive_int, default=1)
    g.add_argument("--distributed-executor-backend", default=None,
                   choices=["mp", "uni", "ray", "external_launcher"])  # fmt: skip
    g.add_argument("--cpu-offload-gb", type=non_negative_float, default=0.0)
    # LoRA
    g.add_argument("--enable-lora", action="store_true")
    g.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH")
    g.add_argument("--max-loras", type=positive_int, default=None)
    g.add_argument("--max-lora-rank", type=positive_int, default=None)
    # Chat
    g.add_argument("--response-role", default="assistant", help="the role of chat replies")
    g.add_argument("--chat-template-content-format", default="auto", choices=["auto", "string", "openai"],
                   help="message content given to the chat template as a string, or as a list of "
                        "OpenAI parts; auto: from what the template does with content")  # fmt: skip
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto": the reply is parsed for tool calls (needs --tool-call-parser)')
    g.add_argument("--tool-call-parser", default=None, metavar="{" + ",".join(tool_parser_names()) + "}",
                   help="the tool-call format of the model's replies")  # fmt: skip
    g.add_argument("--tool-parser-plugin", default=None, help="not supported yet (parsers are built in)")
    g.add_argument("--reasoning-parser", default=None, metavar="{" + ",".join(reasoning_parser_names()) + "}",
                   help="split <think>...</think> into reasoning_content")  # fmt: skip
    g.add_argument("--middleware", action="append", default=[],
                   help="import path of an ASGI middleware class or an @app.middleware('http') "
                        "function to add (repeatable)")  # fmt: skip


def not_supported(flag: str, detail: str = "") -> str:
    return f"{flag} is not supported yet" + (f" ({detail})" if detail else "")


def validate_vllm_compat_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from pagedserve.entrypoints.openai.reasoning_parsers import reasoning_parser_names
    from pagedserve.entrypoints.openai.tool_parsers import tool_parser_names

    fail = parser.error
    if args.load_format not in LOAD_FORMATS:
        fail(not_supported(f"--load-format {args.load_format}", f"supported: {', '.join(LOAD_FORMATS)}"))
    if args.kv_cache_dtype != "auto":
        fail(not_supported(f"--kv-cache-dtype {args.kv_cache_dtype}", "the KV cache is in the model's dtype: auto"))
    if args.tokenizer_mode not in ("auto", "hf"):
        fail(not_supported(f"--tokenizer-mode {args.tokenizer_mode}", "supported: auto, hf"))
    if args.config_format not in ("auto", "hf"):
        fail(not_supported(f"--config-format {args.config_format}", "supported: auto, hf"))
    if args.guided_decoding_backend not in ("auto", "xgrammar"):
        fail(not_supported(f"--guided-decoding-backend {args.guided_decoding_backend}",
                           "structured outputs use xgrammar: auto, xgrammar"))  # fmt: skip
    if args.pipeline_parallel_size != 1:
        fail(not_supported("--pipeline-parallel-size > 1"))
    if args.distributed_executor_backend in ("ray", "external_launcher"):
        fail(not_supported(f"--distributed-executor-backend {args.distributed_executor_backend}",
                           "supported: mp (one worker process per rank), uni (one rank, in the engine)"))
    if args.cpu_offload_gb > 0:
        fail(not_supported("--cpu-offload-gb > 0"))
    for flag, given in (("--enable-lora", args.enable_lora), ("--lora-modules", args.lora_modules),
                        ("--max-loras", args.max_loras), ("--max-lora-rank", args.max_lora_rank)):
        if given:
            fail(not_supported(flag, "LoRA adapters"))
    if not args.response_role.strip():
        fail("--response-role must not be empty")
    if args.tool_parser_plugin:
        fail(not_supported("--tool-parser-plugin", f"built-in parsers: {', '.join(tool_parser_names())}"))
    if args.tool_call_parser is not None and args.tool_call_parser not in tool_parser_names():
        fail(f"--tool-call-parser {args.tool_call_parser!r} is not supported yet "
             f"(known: {', '.join(tool_parser_names())})")  # fmt: skip
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        fail("--enable-auto-tool-choice requires --tool-call-parser")
    if args.reasoning_parser is not None and args.reasoning_parser not in reasoning_parser_names():
        fail(f"--reasoning-parser {args.reasoning_parser!r} is not supported yet "
             f"(known: {', '.join(reasoning_parser_names())})")  # fmt: skip
    for path in args.middleware:
        try:
            import_middleware(path)
        except (ImportError, AttributeError, ValueError) as e:
            fail(f"--middleware {path!r}: {e}")


def import_middleware(path: str) -> Any:
    """`pkg.module.Name` -> the object (a class taking `app`, or an async (request, call_next))."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError("expected an import path 'package.module.Name'")
    obj = getattr(importlib.import_module(module_name), attr)
    if not callable(obj):
        raise ValueError(f"{path} is not a class or function")
    return obj


def vllm_compat_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "revision": args.revision,
        "tokenizer_revision": args.tokenizer_revision,
        "trust_remote_code": args.trust_remote_code,
        "download_dir": args.download_dir,
        "load_format": args.load_format,
        "enable_chunked_prefill": args.enable_chunked_prefill,
        "disable_log_stats": args.disable_log_stats,
        "distributed_executor_backend": args.distributed_executor_backend,
    }
