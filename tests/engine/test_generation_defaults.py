"""Sampling defaults from generation_config.json (vLLM's --generation-config / LLM defaults)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.generation_defaults import load_generation_defaults


def _write(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_keys_present_in_the_file_become_defaults(tmp_path: Path) -> None:
    model = _write(tmp_path / "m", {"bos_token_id": 0, "eos_token_id": [1, 2], "do_sample": True,
                                    "temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                    "repetition_penalty": 1.1, "max_new_tokens": 64})
    assert load_generation_defaults(str(model)) == {
        "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 64}
    assert load_generation_defaults(str(model), "vllm") == {}
    other = _write(tmp_path / "other", {"min_p": 0.05})
    assert load_generation_defaults(str(model), str(other)) == {"min_p": 0.05}
    # overrides by generation_config name or SamplingParams name; None drops a key
    got = load_generation_defaults(str(model), "auto", {"temperature": 0.0, "max_tokens": 8, "top_k": None})
    assert got == {"temperature": 0.0, "top_p": 0.9, "repetition_penalty": 1.1, "max_tokens": 8}
    assert load_generation_defaults(str(tmp_path / "none")) == {}  # no file: no defaults


def test_bad_generation_config_is_a_clear_error(tmp_path: Path) -> None:
    model = _write(tmp_path / "m", {"top_p": 1.5})
    with pytest.raises(ValueError, match="generation config's sampling defaults are invalid"):
        load_generation_defaults(str(model))
    with pytest.raises(ValueError, match="unsupported key 'beam_width'"):
        load_generation_defaults(str(model), "vllm", {"beam_width": 2})
    with pytest.raises(ValueError, match="'auto', 'vllm' or a directory"):
        load_generation_defaults(str(model), str(tmp_path / "missing"))


def test_llm_generate_without_params_uses_the_model_defaults(tiny_checkpoints: Any, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["llama"], model)
    config = json.loads((model / "generation_config.json").read_text())
    _write(model, {**config, "temperature": 0.0, "max_new_tokens": 5})
    llm = LLM(str(model), max_model_len=256, kv_cache_memory_bytes=8 << 20)
    assert llm.get_default_sampling_params().max_tokens == 5
    prompt = {"prompt_token_ids": list(range(10, 40))}
    default = llm.generate(prompt, use_tqdm=False)[0].outputs[0]
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert list(default.token_ids) == list(greedy.token_ids) and 1 <= len(default.token_ids) <= 5
    plain = LLM(str(model), max_model_len=256, kv_cache_memory_bytes=8 << 20, generation_config="vllm")
    assert plain.get_default_sampling_params().max_tokens == SamplingParams().max_tokens
