"""Qwen v1 (`QWenLMHeadModel`, Qwen-7B-Chat layout) without its remote code: a tiny checkpoint in
the published layout (config keys, tensor names, fused c_attn, qwen.tiktoken; no .py files at
all) gives the greedy tokens of the same weights in transformers' Qwen2ForCausalLM, also under
chunked prefill, prefix caching and preemption; its tokenizer (tiktoken) round-trips text and
renders ChatML as Qwen's make_context does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve.model_executor.model_spec import ModelSpec, load_hf_config
from pagedserve.tokenizers.qwen_tiktoken import QWEN_SPECIAL_TOKENS, QwenTiktokenTokenizer
from tests.engine.engine_helpers import (
    MAX_TOKENS,
    greedy,
    hf_greedy,
    make_engine,
    make_prompts,
    run_staggered,
)
from tests.models.families.published_layout import qwen1_to_qwen2, write_qwen1_checkpoint


@pytest.fixture(scope="module")
def qwen1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model_dir = write_qwen1_checkpoint(tmp_path_factory.mktemp("qwen1") / "Qwen-7B-Chat-tiny")
    tokenizer = QwenTiktokenTokenizer.from_pretrained(str(model_dir))
    hf = qwen1_to_qwen2(model_dir)
    num_ranks = len(tokenizer) - len(QWEN_SPECIAL_TOKENS)  # ordinary tokens: ids < num_ranks
    prompts = make_prompts(num_ranks, seed=0)  # the 16 prompts of 1..300 tokens
    expected = [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    return {"dir": str(model_dir), "hf": hf, "tok": tokenizer, "prompts": prompts, "expected": expected,
            "num_ranks": num_ranks}


def assert_matches(finished: dict[str, Any], expected: list[list[int]]) -> None:
    assert len(finished) == len(expected)
    for i, ref in enumerate(expected):
        got = list(finished[str(i)].outputs[0].token_ids)
        assert got == ref, f"prompt {i}: {got} != {ref}"


def test_published_config_is_read_by_our_adapter(qwen1: dict[str, Any]) -> None:
    assert not list(Path(qwen1["dir"]).glob("*.py"))  # nothing to run even if we wanted to
    from transformers import PretrainedConfig

    config = load_hf_config(qwen1["dir"])
    assert type(config) is PretrainedConfig and config.kv_channels == 16  # the base class: no remote code
    spec = ModelSpec.from_hf(config)
    assert spec.architectures == ("QWenLMHeadModel",) and spec.intermediate_size == 96
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias) == (True, False, False)
    assert spec.max_context_len == 512  # seq_length


def test_greedy_matches_oracle(qwen1: dict[str, Any]) -> None:
    engine = make_engine(qwen1["dir"])
    assert isinstance(engine.get_tokenizer(), QwenTiktokenTokenizer)
    assert_matches(run_staggered(engine, qwen1["prompts"], greedy()), qwen1["expected"])


def test_greedy_matches_oracle_with_chunked_prefill(qwen1: dict[str, Any]) -> None:
    engine = make_engine(qwen1["dir"], max_num_batched_tokens=32)
    assert_matches(run_staggered(engine, qwen1["prompts"], greedy()), qwen1["expected"])
    assert engine.get_stats().last.num_scheduled_tokens <= 32


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_greedy_matches_oracle_under_preemption(qwen1: dict[str, Any], mode: str) -> None:
    # 24 blocks of 16 slots for ~2000 prompt tokens admitted in 64-token chunks: preemption.
    engine = make_engine(qwen1["dir"], num_gpu_blocks_override=24, max_model_len=320,
                         max_num_batched_tokens=64, preemption_mode=mode, enable_prefix_caching=False)
    assert_matches(run_staggered(engine, qwen1["prompts"], greedy(), per_step=16), qwen1["expected"])
    stats = engine.get_stats()
    assert stats.last is not None and stats.last.num_preemptions > 0


def test_greedy_matches_oracle_with_prefix_caching(qwen1: dict[str, Any]) -> None:
    [shared] = make_prompts(qwen1["num_ranks"], seed=7, lengths=(150,))
    tails = make_prompts(qwen1["num_ranks"], seed=8, lengths=(1, 5, 16, 30, 47))
    prompts = [shared + t for t in tails] + [shared[:100], shared]
    expected = [hf_greedy(qwen1["hf"], p, MAX_TOKENS) for p in prompts]
    engine = make_engine(qwen1["dir"], enable_prefix_caching=True)
    assert_matches(run_staggered(engine, prompts, greedy(), per_step=1), expected)
    assert engine.get_stats().prefix_cache_hit_rate > 0.5


TEXTS = ("The model runs quickly, 42 times!", "  leading spaces\n\nand\ttabs  ", "",
         "Ünïcödé, 你好, emoji \U0001f600 and a\r\nCRLF", "<|im_start|>user\nhi<|im_end|><|endoftext|>")


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(qwen1: dict[str, Any], text: str) -> None:
    tok: QwenTiktokenTokenizer = qwen1["tok"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if text.isascii():  # every token decodes on its own (no UTF-8 sequence split across tokens)
        assert "".join(tok.decode([i]) for i in ids) == text



def test_streamed_text_equals_decode(qwen1: dict[str, Any]) -> None:
    from pagedserve.engine.output_processor import IncrementalDetokenizer

    tok: QwenTiktokenTokenizer = qwen1["tok"]
    ids = tok.encode("Ünïcödé 你好 \U0001f600<|im_end|> the end")
    for skip in (False, True):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        pieces = [detok.step(i) for i in ids]
        assert "".join(pieces) + detok.flush() == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in p for p in pieces)  # split UTF-8 sequences are held back

def test_special_tokens_as_published(qwen1: dict[str, Any]) -> None:
    tok: QwenTiktokenTokenizer = qwen1["tok"]
    eod = qwen1["num_ranks"]  # specials follow the mergeable ranks, in the published order
    assert tok.encode("<|endoftext|><|im_start|><|im_end|><|extra_204|>") == [eod, eod + 1, eod + 2, eod + 207]
    assert tok.eos_token_id == eod and len(tok) == eod + 208
    assert tok.decode([eod + 1, *tok.encode("hi"), eod + 2], skip_special_tokens=True) == "hi"
    assert tok.convert_ids_to_tokens([eod + 2]) == ["<|im_end|>"]
    assert len(tok.encode(" the")) == 1  # trained merges are used


def test_chatml_renders_as_make_context(qwen1: dict[str, Any]) -> None:
    tok: QwenTiktokenTokenizer = qwen1["tok"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "and now?"}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                    "<|im_start|>user\nand now?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, messages[0]],
                                  add_generation_prompt=False)
    eod = qwen1["num_ranks"]
    assert ids[0] == eod + 1 and ids[-1] == eod + 2
    assert tok.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>"


def test_checkpoint_template_wins_over_chatml(tmp_path: Path, qwen1: dict[str, Any]) -> None:
    import json
    import shutil

    shutil.copy(Path(qwen1["dir"]) / "qwen.tiktoken", tmp_path / "qwen.tiktoken")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"}))
    tok = QwenTiktokenTokenizer.from_pretrained(str(tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[user]x"


def test_offline_chat_generates_what_the_oracle_does_on_chatml(qwen1: dict[str, Any]) -> None:
    from pagedserve import LLM

    llm = LLM(model=qwen1["dir"], dtype="float32", max_model_len=256, kv_cache_memory_bytes=8 << 20,
              swap_space=0.01)
    messages = [{"role": "user", "content": "Which river runs by the city?"}]
    [out] = llm.chat(messages, greedy(), use_tqdm=False)
    ids = qwen1["tok"].encode(qwen1["tok"].apply_chat_template(messages, add_generation_prompt=True,
                                                               tokenize=False))
    assert out.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert list(out.prompt_token_ids) == ids
    assert list(out.outputs[0].token_ids) == hf_greedy(qwen1["hf"], ids, MAX_TOKENS)


def test_trust_remote_code_uses_the_checkpoints_config_class(tmp_path: Path, qwen1: dict[str, Any]) -> None:
    import shutil

    model_dir = tmp_path / "with_code"
    shutil.copytree(qwen1["dir"], model_dir)
    # A stand-in for the published configuration_qwen.py (auto_map: configuration_qwen.QWenConfig).
    (model_dir / "configuration_qwen.py").write_text(
        "from transformers import PretrainedConfig\n\n\n"
        "class QWenConfig(PretrainedConfig):\n"
        "    model_type = 'qwen'\n\n"
        "    def __init__(self, **kwargs):\n"
        "        self.ran_checkpoint_code = True\n"
        "        super().__init__(**kwargs)\n")
    plain = load_hf_config(str(model_dir))
    assert not hasattr(plain, "ran_checkpoint_code")
    remote = load_hf_config(str(model_dir), trust_remote_code=True)
    assert type(remote).__name__ == "QWenConfig" and remote.ran_checkpoint_code
    assert ModelSpec.from_hf(remote) == ModelSpec.from_hf(plain)


def test_openai_chat_through_the_server(tmp_path: Path, qwen1: dict[str, Any]) -> None:
    """The server (engine core in its own process) chats with ChatML and streams the same text."""
    import openai

    from tests.server.conftest import start_server

    messages = [{"role": "user", "content": "Tell me a story about the river."}]
    tok: QwenTiktokenTokenizer = qwen1["tok"]
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    want = tok.decode(hf_greedy(qwen1["hf"], ids, MAX_TOKENS), skip_special_tokens=True)
    with start_server(qwen1["dir"], tmp_path) as server:
        c = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
        kwargs: dict[str, Any] = dict(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
        r = c.chat.completions.create(**kwargs)
        assert r.usage is not None and r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == want
        chunks = list(c.chat.completions.create(stream=True, **kwargs))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_matches_oracle_on_gpu_with_triton_and_cuda_graphs(qwen1: dict[str, Any]) -> None:
    from pagedserve import LLM

    llm = LLM(qwen1["dir"], dtype="float32", max_model_len=512, max_num_seqs=16, enforce_eager=False,
              gpu_memory_utilization=0.3)
    assert llm.llm_engine.engine_core.runner.decode_graphs is not None
    outs = llm.generate([{"prompt_token_ids": p} for p in qwen1["prompts"]], greedy(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == qwen1["expected"]
