"""How long a large `enum` JSON schema takes to compile, serialize and deserialize with xgrammar,
and whether the GIL is released meanwhile (a ticker thread counts the 10 ms sleeps it gets to
run; ~100% of the expected ticks means the loop thread would not be stalled).

    python -m benchmarks.grammar_compile --model /path/to/checkpoint --enum 30000

Prints one table row per phase; the design these numbers support is in structured_output.py.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from typing import Any


def timed_with_ticker(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, fraction of expected 10 ms ticks another thread got meanwhile)."""
    ticks = 0
    done = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not done.wait(0.01):
            ticks += 1

    thread = threading.Thread(target=tick)
    thread.start()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    done.set()
    thread.join()
    return result, seconds, ticks / max(1.0, seconds / 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (its tokenizer is used)")
    parser.add_argument("--enum", type=int, default=30_000, help="number of enum values")
    args = parser.parse_args()
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    schema = json.dumps({"type": "string", "enum": [f"value-{i}" for i in range(args.enum)]})
    print(f"vocab {len(tokenizer)}, enum {args.enum}, schema {len(schema)} bytes")
    print(f"{'phase':<12} {'seconds':>8} {'GIL free':>9}")
    compiled, s, free = timed_with_ticker(lambda: compiler.compile_json_schema(schema))
    print(f"{'compile':<12} {s:8.2f} {free:9.0%}")
    serialized, s, free = timed_with_ticker(compiled.serialize_json)
    print(f"{'serialize':<12} {s:8.2f} {free:9.0%}   ({len(serialized) / 1e6:.1f} MB)")
    _, s, free = timed_with_ticker(lambda: xgr.CompiledGrammar.deserialize_json(serialized, info))
    print(f"{'deserialize':<12} {s:8.2f} {free:9.0%}")


if __name__ == "__main__":
    main()
