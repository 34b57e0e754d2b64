"""The fixed ShareGPT-like request mix every benchmark and every peer runs (issue 4's recipe; it
lives in the package, pagedserve/tune/workload.py, so that `pagedserve tune` replays the same mix),
and the named workloads of `benchmarks/throughput.py --workload` (issue 13), each deterministic:

    name                 prompts (tokens)               outputs (tokens)   sampling / engine
    sharegpt             the mix (mean ~195)            the mix (~178)     temperature 1, top_p 1
    long-prompts         2000 each                      128 each           as sharegpt
    long-outputs         128 each                       1000 each          as sharegpt; 256 concurrent
    realistic-sampling   the mix                        the mix            T 0.7, top_p 0.9, top_k 50,
                                                                           repetition_penalty 1.1,
                                                                           seed i for request i
    shared-prefix        1024-token system prompt +     the mix            as sharegpt; prefix caching
                         the mix's prompt                                  on (the prefix is computed once)

`scale` shrinks every length (the --tiny CPU run); random token ids are drawn from [100, vocab-100)
as the mix draws them. Every request runs with ignore_eos, so the token counts are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagedserve.tune.workload import Workload, sharegpt_like

__all__ = ["WORKLOADS", "NamedWorkload", "Workload", "engine_settings", "named_workload", "sharegpt_like"]

PLAIN_SAMPLING: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}
REALISTIC_SAMPLING: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1}
SYSTEM_PROMPT_LEN = 1024  # a multiple of every block size, so all of it can be cached


@dataclass(slots=True)
class NamedWorkload:
    name: str
    work: Workload
    sampling: list[dict[str, Any]]  # SamplingParams kwargs per request (max_tokens, ignore_eos added)
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None  # the concurrency the workload is defined at; None: the engine's
    shared_prefix_len: int = 0  # leading prompt tokens every request shares
    notes: list[str] = field(default_factory=list)


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _random_prompts(rng: np.random.Generator, vocab: int, lens: list[int]) -> list[list[int]]:
    return [rng.integers(100, vocab - 100, size=n).tolist() for n in lens]


def _sharegpt(vocab: int, n: int, scale: float) -> NamedWorkload:
    work = sharegpt_like(vocab, n)
    if scale != 1.0:
        work = Workload([p[: _scaled(len(p), scale)] for p in work.prompts],
                        [_scaled(o, scale) for o in work.output_lens])
    return NamedWorkload("sharegpt", work, [dict(PLAIN_SAMPLING) for _ in range(n)])


def _long_prompts(vocab: int, n: int, scale: float) -> NamedWorkload:
    rng = np.random.default_rng(1301)
    prompts = _random_prompts(rng, vocab, [_scaled(2000, scale)] * n)
    return NamedWorkload("long-prompts", Workload(prompts, [_scaled(128, scale)] * n),
                         [dict(PLAIN_SAMPLING) for _ in range(n)])


def _long_outputs(vocab: int, n: int, scale: float) -> NamedWorkload:
    rng = np.random.default_rng(1302)
    prompts = _random_prompts(rng, vocab, [_scaled(128, scale)] * n)
    return NamedWorkload("long-outputs", Workload(prompts, [_scaled(1000, scale)] * n),
                         [dict(PLAIN_SAMPLING) for _ in range(n)], **engine_settings("long-outputs"))


def _realistic_sampling(vocab: int, n: int, scale: float) -> NamedWorkload:
    base = _sharegpt(vocab, n, scale)
    sampling = [{**REALISTIC_SAMPLING, "seed": i} for i in range(n)]
    return NamedWorkload("realistic-sampling", base.work, sampling)


def _shared_prefix(vocab: int, n: int, scale: float) -> NamedWorkload:
    base = _sharegpt(vocab, n, scale)
    prefix_len = _scaled(SYSTEM_PROMPT_LEN, scale)
    system = np.random.default_rng(1303).integers(100, vocab - 100, size=prefix_len).tolist()
    work = Workload([system + p for p in base.work.prompts], list(base.work.output_lens))
    return NamedWorkload("shared-prefix", work, [dict(PLAIN_SAMPLING) for _ in range(n)],
                         shared_prefix_len=prefix_len, **engine_settings("shared-prefix"))


def engine_settings(name: str) -> dict[str, Any]:
    """The engine settings a workload is defined at (known before any engine starts, so that the
    workloads sharing settings can share an engine): max_num_seqs, enable_prefix_caching."""
    settings: dict[str, Any] = {"max_num_seqs": None, "enable_prefix_caching": True}
    if name == "long-outputs":
        settings["max_num_seqs"] = 256  # "about 1,000 tokens out, 256 concurrent"
    return settings


WORKLOADS: dict[str, Callable[[int, int, float], NamedWorkload]] = {
    "sharegpt": _sharegpt,
    "long-prompts": _long_prompts,
    "long-outputs": _long_outputs,
    "realistic-sampling": _realistic_sampling,
    "shared-prefix": _shared_prefix,
}


def named_workload(name: str, vocab_size: int, num_requests: int, scale: float = 1.0,
                   max_model_len: int | None = None) -> NamedWorkload:
    """The workload `name` of num_requests requests; with max_model_len, every request is cut to
    fit (prompt first, then output: Workload.clipped) and the cut is noted."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    if not 0.0 < scale <= 1.0:
        raise ValueError("scale must be in (0, 1]")
    named = WORKLOADS[name](vocab_size, num_requests, scale)
    if max_model_len is not None:
        clipped = named.work.clipped(None, None, max_model_len)
        if (clipped.num_input_tokens, clipped.num_output_tokens) != (named.work.num_input_tokens,
                                                                       named.work.num_output_tokens):
            named.notes.append(f"cut to fit max_model_len {max_model_len}")
        named.work = clipped
    return named
