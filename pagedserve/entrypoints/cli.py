"""The `pagedserve` command.

pagedserve serve [MODEL] [vLLM server flags]    OpenAI-compatible server (built-in SmolLM2-135M-Instruct if none)
pagedserve generate [--model M] PROMPT...       offline completions through `LLM`
pagedserve audit verify FILE [--key-file K] [--expect-head [SEQ:]HASH] [--checkpoint CP]
                                                check an audit log (chain, HMACs, checkpoint)
pagedserve --version                            print the version
pagedserve --help                               this text (`pagedserve serve --help`: the flags)
pagedserve router --config router.yaml          multi-region router in front of servers
pagedserve model keygen|sign|push|pull|verify   model repository: manifests, signatures, s3:// (fsspec)
pagedserve tune [--model M] [--workload W] [-o tuned.yaml]
                                                search engine settings for the best goodput under SLOs
                                                (then: pagedserve serve --config tuned.yaml)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pagedserve.entrypoints.config_file import expand_config_file
from pagedserve.entrypoints.openai.cli_args import add_server_args, validate_args


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagedserve generate", allow_abbrev=False,
                                description="Generate completions offline and print them.")  # fmt: skip
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: the built-in model)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    return p


def generate_main(argv: Sequence[str]) -> int:
    parser = _generate_parser()
    args = parser.parse_args(argv)
    from pagedserve.engine.llm import LLM
    from pagedserve.sampling_params import SamplingParams

    try:
        params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)  # fmt: skip
    except ValueError as e:
        parser.error(str(e))
    model = args.model
    extra: dict[str, Any] = {}
    if model is None:  # the built-in model: SmolLM2-135M-Instruct, else the demo (builtin_model.py)
        from pagedserve.builtin_model import builtin_model

        builtin = builtin_model()
        model, extra["served_model_name"] = builtin.model, builtin.served_model_name
    if args.kv_cache_memory_bytes:
        extra["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    llm = LLM(model=model, dtype=args.dtype, max_model_len=args.max_model_len, **extra)
    for output in llm.generate(args.prompts, params, use_tqdm=False):
        for completion in output.outputs:
            print(f"{output.prompt!r} -> {completion.text!r}")
    return 0


def serve_main(argv: Sequence[str]) -> int:
    from pagedserve.entrypoints.openai.api_server import run_server

    parser = argparse.ArgumentParser(prog="pagedserve serve", allow_abbrev=False,
                                     description="OpenAI-compatible server (vLLM's flags).")  # fmt: skip
    add_server_args(parser, positional_model=True)
    args = parser.parse_args(expand_config_file(parser, argv))  # --config FILE: flags from YAML
    validate_args(parser, args)
    try:
        run_server(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def tune_main(argv: Sequence[str]) -> int:
    from pagedserve.tune.search import tune_main as run

    return run(argv)


def router_main(argv: Sequence[str]) -> int:
    from pagedserve.router.app import router_main as run

    return run(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": serve_main, "generate": generate_main, "router": router_main, "tune": tune_main}
    if argv and argv[0] == "audit":
        from pagedserve.ops.audit_verify import audit_main

        return audit_main(argv[1:])
    if argv and argv[0] == "model":
        from pagedserve.model_repo.cli import model_main

        return model_main(argv[1:])
    usage = "usage: pagedserve {serve,generate,audit,router,model,tune} ...\n" + (__doc__ or "")
    if argv[:1] in (["-h"], ["--help"]):  # asked for: stdout, success (argparse's convention)
        print(usage)
        return 0
    if argv[:1] in (["-V"], ["--version"]):
        from pagedserve import __version__

        print(__version__)  # the bare version, as `vllm --version`
        return 0
    if not argv or argv[0] not in commands:  # a usage error: stderr, exit 2
        print(usage, file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
