"""Where a step waits for the GPU: every host synchronization (torch.cuda.set_sync_debug_mode)
that the engine's step makes, counted per call site, for a batch of randomly sampled requests
(temperature 1.0, the server benchmark's) with new prompts arriving while others decode.

    python -m benchmarks.sync_points [--model DIR] [--steps 40] [--no-async-scheduling]

Async scheduling overlaps step n+1's host work with step n's device work only if nothing in
between waits for the device: a blocking copy to the GPU (torch.tensor(list, device="cuda")),
.item(), .tolist() or bool() of a device tensor each wait for every kernel queued before them.
Prints the call sites (innermost pagedserve frames) with their counts, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings
from typing import Any

import torch

from benchmarks.common import write_json
from pagedserve.config import EngineArgs
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.sampling_params import SamplingParams
from pagedserve.testing.checkpoints import build_checkpoint


def call_site(stack: list[traceback.FrameSummary], depth: int = 4) -> str:
    ours = [f for f in stack if "/pagedserve/" in f.filename and "sync_points" not in f.filename]
    return " <- ".join(f"{f.filename.split('/pagedserve/')[-1]}:{f.lineno} {f.name}" for f in reversed(ours[-depth:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: a tiny random Llama built here")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = args.model or build_checkpoint("/tmp/sync-points-llama", "llama")
    engine = LLMEngine.from_engine_args(EngineArgs(model=model, async_scheduling=args.async_scheduling,
                                                   max_model_len=1024))  # fmt: skip
    params = SamplingParams(temperature=1.0, max_tokens=10_000, ignore_eos=True)
    vocab = 500
    for i in range(8):
        engine.add_request(f"warm{i}", {"prompt_token_ids": [(i * 7 + j) % vocab for j in range(20 + 9 * i)]}, params)
    for _ in range(20):  # warm: graphs captured, allocator settled
        engine.step()
    sites: collections.Counter[str] = collections.Counter()

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        sites[call_site(traceback.extract_stack()[:-1])] += 1

    old_show = warnings.showwarning
    warnings.showwarning = record
    warnings.simplefilter("always")
    cuda = torch.cuda.is_available()  # on the CPU nothing is counted: a check that the script runs
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        for step in range(args.steps):
            if step % 5 == 0:  # a new prompt arrives while the others decode
                engine.add_request(f"new{step}", {"prompt_token_ids": [(step + j) % vocab for j in range(64)]}, params)
            engine.step()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old_show
    print(f"{sum(sites.values())} host synchronizations in {args.steps} steps "
          f"(async_scheduling={args.async_scheduling}):")
    for site, count in sites.most_common():
        print(f"{count:5d}  {site}")
    write_json(args.json, {"steps": args.steps, "async_scheduling": args.async_scheduling, "sites": dict(sites)})


if __name__ == "__main__":
    main()
