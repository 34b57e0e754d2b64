"""Workloads: the fixed ShareGPT-like request mix every benchmark runs, or a JSONL file.

The built-in mix (issue 4's recipe, also what benchmarks/ use):

    rng = numpy.random.default_rng(0)
    input lengths  = clip(rng.lognormal(ln 150, 0.8, N), 1, 2048)  as integers (mean ~195)
    output lengths = clip(rng.lognormal(ln 130, 0.8, N), 1, 2048)  as integers (mean ~178)
    prompt i       = rng.integers(100, vocab - 100, size=input_len[i]), drawn in order

A JSONL workload: one request a line, {"prompt": "text"} or {"prompt_token_ids": [...]}, with
"output_len" (or "max_tokens") for the tokens to generate (ignore_eos), and optionally
"priority_class" ("interactive" | "batch").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    classes: list[str] = field(default_factory=list)  # per request; empty: all interactive

    def prefix(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.output_lens[:n], self.classes[:n])

    @property
    def num_input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    def clipped(self, max_prompt_len: int | None, max_output_len: int | None, max_model_len: int) -> Workload:
        """Lengths cut so that every request fits max_model_len (prompt first, then output)."""
        prompts, outs = [], []
        for p, n in zip(self.prompts, self.output_lens):
            p = p[: min(max_prompt_len or len(p), max_model_len - 1)]
            n = min(max_output_len or n, n, max_model_len - len(p))
            prompts.append(p)
            outs.append(max(1, n))
        return Workload(prompts, outs, list(self.classes))


def sharegpt_like(vocab_size: int, num_requests: int = 1000) -> Workload:
    rng = np.random.default_rng(0)
    input_lens = np.clip(rng.lognormal(np.log(150), 0.8, num_requests), 1, 2048).astype(int)
    output_lens = np.clip(rng.lognormal(np.log(130), 0.8, num_requests), 1, 2048).astype(int)
    prompts = [rng.integers(100, vocab_size - 100, size=int(n)).tolist() for n in input_lens]
    return Workload(prompts, [int(n) for n in output_lens])


def load_jsonl(path: str, tokenize: Callable[[str], list[int]], num_requests: int | None = None) -> Workload:
    prompts: list[list[int]] = []
    outs: list[int] = []
    classes: list[str] = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ids = row["prompt_token_ids"] if "prompt_token_ids" in row else tokenize(row["prompt"])
            n = int(row.get("output_len", row.get("max_tokens", 128)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: expected prompt or prompt_token_ids and output_len ({e})") from None
        if not ids or n < 1:
            raise ValueError(f"{path}:{lineno}: an empty prompt or output_len < 1")
        prompts.append([int(t) for t in ids])
        outs.append(n)
        classes.append(str(row.get("priority_class", "interactive")))
        if num_requests is not None and len(prompts) >= num_requests:
            break
    if not prompts:
        raise ValueError(f"{path}: no requests")
    return Workload(prompts, outs, classes)


def poisson_arrivals(num: int, rate_rps: float | None, seed: int = 0) -> list[float]:
    """Arrival offsets (s) of a Poisson process at rate_rps (the first at 0); None: all at once."""
    if rate_rps is None or not np.isfinite(rate_rps):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_rps, num)
    return [float(t) for t in np.cumsum(gaps) - gaps[0]]
