"""The server's command line, with vLLM's flag names.

Shared by `python -m pagedserve.entrypoints.openai.api_server` and `pagedserve serve`. Unknown
flags, abbreviations and conflicting combinations fail at start with an argparse error (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pagedserve.config import EngineArgs, parse_slo_ms
from pagedserve.entrypoints.arg_types import json_object as _json_object
from pagedserve.entrypoints.arg_types import non_negative_float as _non_negative_float
from pagedserve.entrypoints.arg_types import non_negative_int as _non_negative_int
from pagedserve.entrypoints.arg_types import port as _port
from pagedserve.entrypoints.arg_types import positive_int as _positive_int
from pagedserve.entrypoints.config_file import add_config_arg, expand_config_file
from pagedserve.entrypoints.openai.structured_limits import add_structured_output_args
from pagedserve.entrypoints.openai.vllm_compat_args import (
    _dtype,  # vLLM spellings (bf16, fp16) of --dtype
    add_vllm_compat_args,
    validate_vllm_compat_args,
    vllm_compat_engine_kwargs,
)
from pagedserve.ops.http_limits import add_hardening_args


def add_server_args(parser: argparse.ArgumentParser, positional_model: bool) -> argparse.ArgumentParser:
    if positional_model:
        parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                            help="model directory, .gguf file or hub id (default: the built-in model)")  # fmt: skip
    parser.add_argument("--model", default=None,
                        help="model directory, .gguf file, hub id, or fsspec URL (s3://bucket/prefix: pulled into the cache)")
    parser.add_argument("--model-public-key", default=None, metavar="PEM",
                        help="Ed25519 public key (file or PEM text): the model's SHA256SUMS.sig must verify")
    add_config_arg(parser)  # --config FILE (entrypoints/config_file.py)
    http = parser.add_argument_group("HTTP server")
    http.add_argument("--host", default="0.0.0.0")
    http.add_argument("--port", type=_port, default=8000)
    http.add_argument("--ssl-keyfile", default=None)
    http.add_argument("--ssl-certfile", default=None)
    http.add_argument("--ssl-ca-certs", default=None)
    http.add_argument("--root-path", default=None)
    http.add_argument("--served-model-name", nargs="+", default=None)
    http.add_argument("--chat-template", default=None, help="a Jinja template, or a file holding one")
    http.add_argument("--max-waiting-requests", type=_non_negative_int, default=None,
                      help="answer 429 once this many requests wait for the engine (load shedding)")  # fmt: skip
    http.add_argument("--uvicorn-log-level", default="warning",
                      choices=["debug", "info", "warning", "error", "critical", "trace"])  # fmt: skip
    http.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    http.add_argument("--log-format", default="json", choices=["json", "text"])
    sec = parser.add_argument_group("security and audit")
    sec.add_argument("--api-key", action="append", default=None, help="accepted API key (repeatable)")
    sec.add_argument("--api-key-file", default=None, help="file of API keys, one 'KEY [TENANT]' a line")
    sec.add_argument("--jwt-secret", default=None, help="accept HS256 JWTs signed with this secret")
    sec.add_argument("--jwt-public-key", default=None, help="accept RS256 JWTs (PEM text or file)")
    sec.add_argument("--jwt-audience", default=None)
    sec.add_argument("--jwt-issuer", default=None)
    sec.add_argument("--jwt-tenant-claim", default="tenant")
    sec.add_argument("--audit-log", default=None, help="append one hash-chained JSON line per request")
    # Tenants (ops/tenants.py): policies from this file, the key file's name=value fields, a JWT claim.
    sec.add_argument("--tenant-config", default=None, metavar="FILE",
                     help="YAML/JSON tenant policies: defaults, tenants, routes (see README, Tenants)")
    sec.add_argument("--jwt-policy-claim", default=None, metavar="CLAIM",
                     help="a JWT claim holding the tenant's policy object (merged over --tenant-config)")
    sec.add_argument("--max-tenant-labels", type=_positive_int, default=None, metavar="N",
                     help="distinct tenant labels in /metrics beyond the configured tenants (default 100)")
    # Hardening (JWT lifetime; keyed audit chain + checkpoints): one block, see ops/auth.py, ops/audit.py.
    sec.add_argument("--jwt-max-lifetime", type=_non_negative_int, default=86400, metavar="SECONDS",
                     help="refuse JWTs living longer (exp - iat, or exp - now without iat); 0 = no limit")
    sec.add_argument("--audit-key-file", default=None, metavar="FILE",
                     help="HMAC key for the audit chain (default: $PAGEDSERVE_AUDIT_KEY; none: unkeyed)")
    sec.add_argument("--audit-checkpoint-interval", type=_positive_int, default=1, metavar="N",
                     help="rewrite the signed FILE.checkpoint every N audit lines (and on open/close)")
    eng = parser.add_argument_group("engine")
    eng.add_argument("--tokenizer", default=None)
    eng.add_argument(
        "--dtype", default="auto", type=_dtype, choices=["auto", "float32", "float", "float16", "half", "bfloat16"]
    )
    eng.add_argument("--max-model-len", type=_positive_int, default=None)
    eng.add_argument("--quantization", "-q", default=None)
    eng.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1)
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    eng.add_argument("--block-size", type=_positive_int, default=16, choices=[1, 2, 4, 8, 16, 32, 64, 128])
    eng.add_argument("--swap-space", type=float, default=4.0, help="GiB of CPU swap space")
    eng.add_argument("--max-num-seqs", type=_positive_int, default=None)  # None: from the device
    eng.add_argument("--max-num-batched-tokens", type=_positive_int, default=None)
    prefix = eng.add_mutually_exclusive_group()
    prefix.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true",
                        default=None)  # fmt: skip
    prefix.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--enforce-eager", action="store_true")
    eng.add_argument("--mixed-graph-max-tokens", type=_non_negative_int, default=1024,
                     help="steps with prefill of up to this many tokens replay CUDA graphs (0: eager)")  # fmt: skip
    eng.add_argument("--max-logprobs", type=_non_negative_int, default=20)
    eng.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    eng.add_argument("--kv-cache-memory-bytes", type=_positive_int, default=None,
                     help="explicit KV cache budget in bytes (default: from gpu-memory-utilization)")  # fmt: skip
    eng.add_argument("--num-gpu-blocks-override", type=_positive_int, default=None)
    eng.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    eng.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    eng.add_argument("--generation-config", default="auto",
                     help="sampling defaults: 'auto' (the model's generation_config.json), 'vllm' "
                          "(none) or a directory holding a generation_config.json")
    eng.add_argument("--override-generation-config", type=_json_object, default=None,
                     help='JSON object replacing generation config keys, e.g. \'{"temperature": 0.5}\'')
    # Off by default in the server, as in vLLM: on the H200 the server with it on answered later
    # (TTFT P50 63 against 34 ms at 16 req/s, benchmarks/results/h200-2026-12-01-issue17-ab-2/).
    # The offline API (EngineArgs) keeps it on.
    eng.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=False,
                     help="plan and launch step n+1 while step n runs on the GPU (default off in the "
                          "server; --no-async-scheduling: plan each step after the last one's tokens)")  # fmt: skip
    add_cpu_args(parser)
    add_slo_args(parser)
    # --- lifecycle: graceful drain and engine death (entrypoints/openai/lifecycle.py)
    life = parser.add_argument_group("shutdown and engine failure")
    life.add_argument("--shutdown-timeout", type=_non_negative_float, default=30.0, metavar="SECONDS",
                      help="on SIGTERM/SIGINT stop admitting and let in-flight requests finish for up to "
                           "this long, then cut the rest with an error (default: 30; 0: cut at once)")
    life.add_argument("--restart-engine", action="store_true",
                      help="respawn a dead engine process in place (at most --max-engine-restarts "
                           "times); without it a dead engine makes the server exit with status 1, "
                           "so that its supervisor restarts the service")
    life.add_argument("--max-engine-restarts", type=_positive_int, default=None, metavar="N",
                      help="engine restarts allowed over the server's life with --restart-engine "
                           "(default: 3); past them the server exits with status 1")
    add_vllm_compat_args(parser)
    add_hardening_args(parser)
    add_structured_output_args(parser)
    return parser


def add_cpu_args(parser: argparse.ArgumentParser) -> None:
    """Host resources of the engine process (pagedserve/worker/cpu_resources.py)."""
    cpu = parser.add_argument_group("CPU resources")
    cpu.add_argument("--cpu-threads", type=_positive_int, default=None,
                     help="torch intra-op threads of the engine process (default on CPU: "
                          "$OMP_NUM_THREADS, else the usable cores minus one for the HTTP process)")  # fmt: skip


def _slo_ms(text: str) -> dict[str, float]:
    try:
        return parse_slo_ms(text, "the objective")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_slo_args(parser: argparse.ArgumentParser) -> None:
    """Service-level objectives (core/slo_controller.py, entrypoints/openai/slo_admission.py)."""
    slo = parser.add_argument_group("service-level objectives")
    slo.add_argument("--slo-ttft-ms", type=_slo_ms, default=None, metavar="MS",
                     help="time-to-first-token objective: requests whose predicted queueing delay "
                          "passes it get 429 + Retry-After; MS or 'interactive=MS,batch=MS'")
    slo.add_argument("--slo-tpot-ms", type=_slo_ms, default=None, metavar="MS",
                     help="time-per-output-token objective: the running batch and each step's token "
                          "budget adapt to hold it; MS or 'interactive=MS,batch=MS'")


def make_arg_parser(prog: str = "pagedserve.entrypoints.openai.api_server", positional_model: bool = False
                    ) -> argparse.ArgumentParser:  # fmt: skip
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="OpenAI-compatible HTTP server (vLLM's flags).",
    )  # fmt: skip
    return add_server_args(parser, positional_model)


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-flag checks; failures go through parser.error (message + exit 2)."""
    tag = getattr(args, "model_tag", None)
    if tag is not None and args.model is not None and tag != args.model:
        parser.error(f"the model is given twice and differently: {tag!r} and --model {args.model!r}")
    if tag is not None:
        args.model = tag
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        parser.error("--ssl-keyfile and --ssl-certfile must be given together")
    if (args.jwt_secret or args.jwt_public_key) and not args.jwt_audience:
        parser.error("--jwt-audience is required with --jwt-secret or --jwt-public-key")
    if args.jwt_audience and not (args.jwt_secret or args.jwt_public_key):
        parser.error("--jwt-audience needs --jwt-secret or --jwt-public-key")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        parser.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.swap_space < 0:
        parser.error(f"--swap-space must be >= 0, got {args.swap_space}")
    if args.quantization is not None:  # the engine checks it against the checkpoint at start
        from pagedserve.model_executor.quantization.base import known_quantization_methods

        if args.quantization.lower() not in known_quantization_methods():
            parser.error(f"--quantization {args.quantization!r} is not a known method; known: "
                         f"{known_quantization_methods()}")
    if args.max_engine_restarts is not None and not args.restart_engine:
        parser.error("--max-engine-restarts needs --restart-engine")
    validate_vllm_compat_args(parser, args)


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None,
               positional_model: bool = False) -> argparse.Namespace:  # fmt: skip
    parser = make_arg_parser(prog or "pagedserve.entrypoints.openai.api_server", positional_model)
    args = parser.parse_args(expand_config_file(parser, sys.argv[1:] if argv is None else argv))
    validate_args(parser, args)
    return args


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    names = args.served_model_name
    return EngineArgs(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        seed=args.seed,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        swap_space=args.swap_space,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        usage_context="server",  # vLLM's server row of the device defaults (batch_defaults.py)
        enable_prefix_caching=True if args.enable_prefix_caching is None else args.enable_prefix_caching,
        preemption_mode=args.preemption_mode,
        scheduling_policy=args.scheduling_policy,
        async_scheduling=args.async_scheduling,
        enforce_eager=args.enforce_eager,
        mixed_graph_max_tokens=args.mixed_graph_max_tokens,
        quantization=args.quantization,
        tensor_parallel_size=args.tensor_parallel_size,
        device=args.device,
        served_model_name=names[0] if names else None,
        max_logprobs=args.max_logprobs,
        generation_config=args.generation_config,
        override_generation_config=args.override_generation_config,
        cpu_threads=getattr(args, "cpu_threads", None),
        model_public_key=getattr(args, "model_public_key", None),
        slo_ttft_ms=getattr(args, "slo_ttft_ms", None),
        slo_tpot_ms=getattr(args, "slo_tpot_ms", None),
        **vllm_compat_engine_kwargs(args),
    )
