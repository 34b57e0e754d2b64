"""SmolLM2-135M-Instruct (its GGUF, dequantized to float32) against transformers loading the same
file: greedy tokens on 16 real prompts, prompt logprobs and perplexity over an English paragraph,
the chat template's answer to the France question, and reproducible seeded sampling."""

from __future__ import annotations

import math
from typing import Any

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.testing.real_text import FRANCE_QUESTION, PARAGRAPH
from tests.smollm2.conftest import MAX_TOKENS, hf_logprobs


@pytest.fixture(scope="module")
def llm(smollm2_file: str, smollm2_cache: str) -> LLM:
    return LLM(model=smollm2_file, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=96 << 20,
               max_num_seqs=16)


def test_greedy_equals_transformers_on_16_real_prompts(llm: LLM, prompt_ids: list[list[int]],
                                                        hf_greedy_outputs: list[list[int]]) -> None:
    lengths = sorted(len(p) for p in prompt_ids)
    assert len(prompt_ids) >= 16 and lengths[0] <= 3 and lengths[-1] >= 200  # mixed lengths
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    for i, (out, expected) in enumerate(zip(outs, hf_greedy_outputs)):
        assert list(out.outputs[0].token_ids) == expected, f"prompt {i}: {out.outputs[0].text!r}"


def test_prompt_logprobs_and_perplexity_match_transformers(llm: LLM, hf_smollm2: tuple[Any, Any]) -> None:
    model, tok = hf_smollm2
    ids = tok(PARAGRAPH, add_special_tokens=False).input_ids
    assert len(ids) > 50
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    ref = hf_logprobs(model, ids)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    ours = [out.prompt_logprobs[pos][ids[pos]].logprob for pos in range(1, len(ids))]  # type: ignore[index]
    theirs = [ref[pos - 1, ids[pos]].item() for pos in range(1, len(ids))]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3
    ppl_ours, ppl_theirs = (math.exp(-sum(x) / len(x)) for x in (ours, theirs))
    assert ppl_theirs < 30  # a trained model on plain English (random weights: ~ the vocab size)
    assert abs(ppl_ours - ppl_theirs) / ppl_theirs < 1e-3


def test_chat_template_answers_paris(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": FRANCE_QUESTION}], SamplingParams(max_tokens=24, temperature=0),
                   use_tqdm=False)
    text = out[0].outputs[0].text
    assert "Paris" in text, text


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    prompt = "Write one sentence about the ocean."
    messages = [{"role": "user", "content": prompt}]
    params = [SamplingParams(max_tokens=32, temperature=0.7, seed=s) for s in (11, 11, 12)]
    texts = [llm.chat(messages, p, use_tqdm=False)[0].outputs[0].text for p in params]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]  # the seed matters
    words = texts[0].split()
    assert len(words) >= 5 and sum(w.strip(".,!?;:'\"").isalpha() for w in words) >= 0.8 * len(words), texts[0]
