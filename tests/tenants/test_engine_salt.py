"""cache_salt through the offline engine (vLLM's dict-prompt key): the same salt hits the cached
prompt blocks, another salt or none does not."""

from __future__ import annotations

from typing import Any

from pagedserve import EngineArgs, LLMEngine, SamplingParams
from tests.server.conftest import ENGINE_KWARGS


def cached_tokens(engine: LLMEngine, request_id: str, prompt: Any) -> int:
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=1, temperature=0))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    assert final is not None
    return final.num_cached_tokens


def test_offline_cache_salt(tiny_checkpoints: Any) -> None:
    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_checkpoints["llama"], block_size=16, **ENGINE_KWARGS))
    ids = [(5 * i + 1) % 400 + 1 for i in range(40)]  # 2 full blocks can hit (the last token is computed)
    assert cached_tokens(engine, "a1", {"prompt_token_ids": ids, "cache_salt": "a"}) == 0
    assert cached_tokens(engine, "a2", {"prompt_token_ids": ids, "cache_salt": "a"}) == 32
    assert cached_tokens(engine, "b1", {"prompt_token_ids": ids, "cache_salt": "b"}) == 0
    assert cached_tokens(engine, "n1", {"prompt_token_ids": ids}) == 0
    assert cached_tokens(engine, "n2", ids) == 32  # unsalted requests share among themselves
