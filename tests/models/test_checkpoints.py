"""The tiny-checkpoint builders: tokenizer, chat template, configs, demo model cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from pagedserve.model_executor.loader import load_model
from pagedserve.testing.checkpoints import build_checkpoint, build_demo_checkpoint, build_tokenizer


def test_tokenizer_is_deterministic_and_loads(tmp_path: Path) -> None:
    build_tokenizer(str(tmp_path / "a"))
    build_tokenizer(str(tmp_path / "b"))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert len(tok) == 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    text = "The model reads 42 tokens, Alice!"
    ids = tok(text).input_ids
    assert ids[0] == 0 and len(ids) < len(text)  # <s> first, merges learned
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template(tiny_checkpoints: Any) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n"
                    "<|user|>\nBye</s>\n<|assistant|>\n")
    no_prompt: Any = tok.apply_chat_template(messages[:2], tokenize=False)
    assert no_prompt.endswith("Hi</s>\n")
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids and ids.count(0) == 1


def test_checkpoint_files_and_validation(tiny_checkpoints: Any, tmp_path: Path) -> None:
    mistral = Path(tiny_checkpoints["mistral"])
    cfg = json.loads((mistral / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["sliding_window"] == 64
    assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    gen = json.loads((mistral / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_checkpoint(str(tmp_path / "x"), "gpt2")
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_checkpoint(str(tmp_path / "x"), "llama", dtype="int8")


def test_demo_checkpoint_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    path = build_demo_checkpoint()
    assert Path(path) == tmp_path / "demo-model"
    stamp = Path(path) / "model.safetensors"
    mtime = stamp.stat().st_mtime_ns
    assert build_demo_checkpoint() == path and stamp.stat().st_mtime_ns == mtime  # reused
    assert [p.name for p in tmp_path.iterdir()] == ["demo-model"]  # no temp dirs left behind
    loaded = load_model(path, torch.float32, "cpu", show_progress=False)
    assert loaded.hf_config.architectures == ["LlamaForCausalLM"]
    assert AutoTokenizer.from_pretrained(path).chat_template is not None
