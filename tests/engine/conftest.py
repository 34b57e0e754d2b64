"""Engine-test fixtures: HF greedy references computed once per architecture and session."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.engine.engine_helpers import MAX_TOKENS, hf_greedy, make_prompts


@pytest.fixture(scope="session")
def greedy_reference(
    hf_reference: Callable[[str], tuple[Any, Any]],
) -> Callable[[str], tuple[list[list[int]], list[list[int]]]]:
    """get(arch) -> (prompts, HF greedy continuations of MAX_TOKENS tokens)."""
    cache: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    def get(arch: str) -> tuple[list[list[int]], list[list[int]]]:
        if arch not in cache:
            model, _ = hf_reference(arch)
            prompts = make_prompts(model.config.vocab_size)
            cache[arch] = (prompts, [hf_greedy(model, p, MAX_TOKENS) for p in prompts])
        return cache[arch]

    return get
