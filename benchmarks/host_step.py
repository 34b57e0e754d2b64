"""Host CPU time per engine step with the model stubbed out: the scheduler's, runner's, sampler's
and output processor's Python work on the throughput benchmark's schedule (ShareGPT-like mix,
temperature 1, 256 seqs, 2048 batched tokens), on any machine. The stub returns preallocated
hidden states and random logits, so two trees compare by their host work alone.

    python -m benchmarks.host_step [--num-requests 200] [--label NAME] [--count-calls]

--count-calls runs the timed part under cProfile and reports its Python function calls per step
instead: a deterministic measure of host work, for machines too shared to time reliably.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from typing import Any

import torch

from benchmarks.workload import sharegpt_like


class _StubModel:
    """forward -> hidden [T, 64] zeros; compute_logits -> logits [N, vocab] (a fresh copy: the
    sampler edits logits in place)."""

    def __init__(self, vocab_size: int) -> None:
        self.hidden = torch.zeros(4096, 64)
        self.logits = torch.randn(512, vocab_size)

    def __call__(self, input_ids: torch.Tensor, positions: Any, kv_caches: Any, metadata: Any) -> torch.Tensor:
        return self.hidden[: input_ids.shape[0]]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[: hidden.shape[0]].clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--label", default="")
    parser.add_argument("--count-calls", action="store_true")
    args = parser.parse_args()
    from pagedserve import LLM, SamplingParams
    from pagedserve.testing.checkpoints import build_checkpoint

    checkpoint = build_checkpoint(tempfile.mkdtemp(prefix="host-step-"), "llama")
    llm = LLM(checkpoint, max_num_seqs=256, max_model_len=2048, max_num_batched_tokens=2048,
              kv_cache_memory_bytes=900 << 20, dtype="float32", device="cpu")
    core = llm.llm_engine.engine_core
    runner = core.runner
    stub = _StubModel(runner.vocab_size)
    runner.model = stub
    for part in ("sampling",):  # the runner's parts that hold the model (absent in older trees)
        if hasattr(runner, part):
            getattr(runner, part).model = stub
    work = sharegpt_like(runner.vocab_size, args.num_requests)
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n) for n in work.output_lens]
    prompts: list[Any] = [{"prompt_token_ids": p} for p in work.prompts]
    llm.generate(prompts[:20], params[:20], use_tqdm=False)  # warm-up
    steps_before = core.stats.num_steps
    profile = cProfile.Profile() if args.count_calls else None
    started = time.process_time()  # CPU time: robust to other processes on a shared machine
    if profile is not None:
        profile.enable()
    llm.generate(prompts, params, use_tqdm=False)
    if profile is not None:
        profile.disable()
    cpu = time.process_time() - started
    steps = core.stats.num_steps - steps_before
    if profile is not None:
        calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
        print(f"{args.label} steps {steps} python calls {calls} per step {calls / steps:.1f}")
    else:
        print(f"{args.label} steps {steps} cpu {cpu:.2f} s per step {1e3 * cpu / steps:.3f} ms")


if __name__ == "__main__":
    main()
