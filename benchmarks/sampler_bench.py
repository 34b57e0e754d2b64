"""Sampler step time: realistic sampling, before and after the sorting-free sampler, vs plain.

    python -m benchmarks.sampler_bench [--rows 256] [--vocab 128256] [--iters 20] [--json OUT]

Each case is one engine step's sampling work for N rows of [N, V] float32 logits (a fresh copy of
the same random logits every iteration): building the SamplingMetadata from the requests' state,
reseeding the per-request generators (seeded cases), the sampler itself, and for the new path
the token-count update (old: per-row generator reseeding and draws). Every request has a 512-token prompt and 128 output tokens so far.

    greedy      temperature 0
    plain       temperature 0.7 (no truncation, no penalty, no seed)
    old         temperature 0.7, top_p 0.9, top_k 50, repetition_penalty 1.1, seed per request:
                penalties from ragged lists rebuilt every step, top-k/top-p by a full sort
    new         the same parameters: penalties from the persistent device token counts,
                top-k/top-p decided on the largest logits, seeded noise for all rows in one
                counter-based pass (worker/sampling_state.py, kernels/reference_sampling.py)

Median wall time per step over --iters (CUDA synchronised), and each case relative to plain.
Runs on CPU (small --vocab for a quick look) and on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.common import environment, print_table, write_json
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.input_batch import RequestState
from pagedserve.worker.sampler import Sampler, SamplingMetadata, apply_top_k_top_p, top_k_top_p_sort
from pagedserve.worker.sampling_state import PenaltyState, SeededDraws, choose_seeded_kernel

PROMPT_LEN, OUTPUT_LEN = 512, 128


def _sorting_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int,
                         top_p: torch.Tensor | None) -> torch.Tensor:
    """The sampler before the candidates: top-p (with or without top-k) by a full sort."""
    if top_p is None:
        return apply_top_k_top_p(logits, top_k, max_top_k, top_p)
    return top_k_top_p_sort(logits, top_k, max_top_k, top_p)


class SortingSampler(Sampler):
    top_k_top_p = staticmethod(_sorting_top_k_top_p)
    compact = False


def _states(params: SamplingParams, rows: int, vocab: int) -> list[RequestState]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(rows):
        prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=g).tolist()
        state = RequestState(str(i), prompt, torch.randint(0, vocab, (OUTPUT_LEN,), generator=g).tolist(),
                             params, [], 0, None)
        out.append(state)
    return out


def _step_fn(params: SamplingParams, rows: int, vocab: int, device: torch.device, counts: bool,
             sampler: Sampler) -> Callable[[torch.Tensor], None]:
    states = _states(params, rows, vocab)
    live = {s.req_id: s for s in states}
    table = PenaltyState(rows, vocab, device) if counts else None
    seeded = params.seed is not None
    gens = [torch.Generator(device=device) if seeded and not counts else None for _ in states]
    draw = choose_seeded_kernel(device)

    def step(logits: torch.Tensor) -> None:
        step_seeds = [i * 1_000_003 + len(s.output_token_ids) for i, s in enumerate(states)]
        draws = None
        if seeded and counts:  # new: every seeded row in one counter-based pass
            index = torch.tensor([list(range(rows)), step_seeds], dtype=torch.int64).to(device)
            draws = SeededDraws(index[0], index[1], rows, draw)
        for gen, seed in zip(gens, step_seeds):  # old: one generator reseeded per row
            if gen is not None:
                gen.manual_seed(seed)
        token_counts = table.lookup(states, live) if table is not None and params.has_penalties else None
        meta = SamplingMetadata.build(
            [s.sampling_params for s in states], [s.prompt_token_ids for s in states],
            [s.output_token_ids for s in states], gens, [None] * rows, vocab, device,
            token_counts=token_counts, seeded=draws,
        )  # fmt: skip
        out = sampler(logits, meta)
        if table is not None and params.has_penalties:
            table.record(states, out.sampled_token_ids)
        # keep the lists at OUTPUT_LEN tokens: every iteration sees the same sizes
        for s, t in zip(states, out.sampled_token_ids):
            s.output_token_ids[-1] = t

    return step


def _time(step: Callable[[torch.Tensor], None], logits: torch.Tensor, iters: int, warmup: int) -> float:
    times = []
    for i in range(warmup + iters):
        x = logits.clone()
        if logits.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(x)
        if logits.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    # logits shaped like a model's: a few strong candidates over a broad tail
    logits = (torch.randn(args.rows, args.vocab) * 2.5).to(device)
    realistic = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=1)
    cases = {
        "greedy": (SamplingParams(temperature=0.0), False, Sampler()),
        "plain": (SamplingParams(temperature=0.7), False, Sampler()),
        "old (lists + full sort)": (realistic, False, SortingSampler()),
        "new (counts + candidates)": (realistic, True, Sampler()),
    }
    results = []
    for name, (params, counts, sampler) in cases.items():
        step = _step_fn(params, args.rows, args.vocab, device, counts, sampler)
        results.append({"case": name, "median_ms": _time(step, logits, args.iters, args.warmup)})
    plain = next(r["median_ms"] for r in results if r["case"] == "plain")
    for r in results:
        r["vs_plain"] = r["median_ms"] / plain
    env = environment()
    print_table(f"sampler step, [{args.rows}, {args.vocab}] logits on {env['device']} "
                f"(median of {args.iters})", results)
    write_json(args.json, {"command": "python -m benchmarks.sampler_bench " + " ".join(sys.argv[1:]),
                           "rows": args.rows, "vocab": args.vocab, "iters": args.iters, "results": results})


if __name__ == "__main__":
    main()
