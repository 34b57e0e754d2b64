"""The peers on the same model and workload: Hugging Face transformers' static padded batches
(`generate`) and its continuous batching (`ContinuousBatchingManager`, attn "paged|sdpa"), each on
a prefix of the ShareGPT-like mix (their rates are steady over it).

Tokens counted are the requested output tokens (useful work); a static batch also generates
padding up to its longest request, reported separately.

    python -m benchmarks.peers --model DIR [--static-requests 64] [--cb-requests 200] [--cb-throughput] [--json OUT]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_table, write_json
from benchmarks.workload import Workload, sharegpt_like


def static_batches(model, work: Workload, batch_size: int) -> dict:
    torch.cuda.synchronize()
    started = time.perf_counter()
    generated = 0
    for i in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[i : i + batch_size]
        lens = work.output_lens[i : i + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), do_sample=False,
                             max_new_tokens=max(lens), min_new_tokens=max(lens),
                             eos_token_id=None, pad_token_id=0)
        generated += (out.shape[1] - width) * len(prompts)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"engine": f"transformers generate (static batch {batch_size})",
            "requests": len(work.prompts), "elapsed_s": elapsed,
            "output_tokens_per_s": work.num_output_tokens / elapsed,
            "generated_incl_padding_per_s": generated / elapsed}


# transformers' continuous batching configured for throughput (issue 13: 609 output tok/s on the
# H200 against 150.7 at its defaults): 256-token pages, 8192 tokens a batch, 90% of the memory
THROUGHPUT_CB = {"block_size": 256, "max_batch_tokens": 8192, "max_memory_percent": 0.9}


def _cb_config(settings: dict) -> object:
    """transformers' ContinuousBatchingConfig with settings (the page size is `block_size` in some
    releases, `page_size` in others)."""
    import inspect

    try:
        from transformers import ContinuousBatchingConfig
    except ImportError as exc:
        raise RuntimeError("this transformers has no ContinuousBatchingConfig; run without --cb-throughput") from exc
    accepted = inspect.signature(ContinuousBatchingConfig).parameters
    kwargs = dict(settings)
    if "block_size" in kwargs and "block_size" not in accepted:
        kwargs["page_size"] = kwargs.pop("block_size")
    return ContinuousBatchingConfig(**{k: v for k, v in kwargs.items() if k in accepted})


def continuous_batching(model, work: Workload, settings: dict | None = None) -> dict:
    """settings: ContinuousBatchingConfig fields (THROUGHPUT_CB); None: transformers' defaults."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                              max_new_tokens=max(work.output_lens))
    tuned = {"continuous_batching_config": _cb_config(settings)} if settings else {}
    manager = model.init_continuous_batching(generation_config=config, **tuned)
    manager.start()
    try:
        # warm-up request (graph capture / compilation are not timed)
        manager.add_request(work.prompts[0][:16], request_id="warmup", max_new_tokens=4)
        manager.get_result(request_id="warmup", timeout=600)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(work.prompts, work.output_lens)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
        produced = collected = 0
        deadline = started + 1200
        while collected < len(work.prompts):  # results in completion order
            result = manager.get_result(timeout=1.0)
            if result is None:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"continuous batching: {collected} of {len(work.prompts)} done")
                continue
            produced += len(result.generated_tokens)
            collected += 1
        elapsed = time.perf_counter() - started
    finally:
        manager.stop(block=True)
    label = f" {settings}" if settings else " (defaults)"
    return {"engine": "transformers continuous batching (paged|sdpa)" + label,
            "requests": len(work.prompts), "elapsed_s": elapsed,
            "output_tokens_per_s": produced / elapsed, "generated_incl_padding_per_s": produced / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--static-requests", type=int, default=32)
    parser.add_argument("--static-batch", type=int, default=32)
    parser.add_argument("--cb-requests", type=int, default=100)
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--skip-cb", action="store_true")
    parser.add_argument("--cb-throughput", action="store_true",
                        help=f"continuous batching configured for throughput ({THROUGHPUT_CB}) instead of its defaults")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    rows = []
    vocab = None
    if not args.skip_static:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa").cuda().eval()
        vocab = model.config.vocab_size
        work = sharegpt_like(vocab).prefix(args.static_requests)
        rows.append(static_batches(model, work, args.static_batch))
        print_table("peers (so far)", rows)
        write_json(args.json, {"peers": rows, "args": vars(args)})  # kept if a later part fails
        del model
        torch.cuda.empty_cache()
    if not args.skip_cb:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                                     attn_implementation="paged|sdpa").cuda().eval()
        vocab = model.config.vocab_size
        work = sharegpt_like(vocab).prefix(args.cb_requests)
        rows.append(continuous_batching(model, work, THROUGHPUT_CB if args.cb_throughput else None))
    print_table("peers on the same model and workload", rows)
    write_json(args.json, {"peers": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
