"""ChatGLM2/3/GLM-4 in the published ChatGLMModel layout, and transformers' GlmForCausalLM /
Glm4ForCausalLM layouts: greedy tokens equal transformers' GlmForCausalLM (the same weights,
remapped) on 16 prompts, also under chunked prefill, prefix caching and preemption; the config
is read by our adapter from config.json (no checkpoint code runs)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve.model_executor.chatglm_tokenizer import ChatGLMTokenizer, load_chatglm_tokenizer
from pagedserve.model_executor.model_spec import ModelSpec, load_hf_config
from tests.engine.engine_helpers import (
    MAX_TOKENS,
    greedy,
    hf_greedy,
    make_engine,
    make_prompts,
    run_staggered,
)
from tests.models.families.chatglm_layout import build_glm, glm_to_chatglm


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("chatglm")
    glm = build_glm(str(root / "glm"), "glm")
    return {"glm": glm, "chatglm": glm_to_chatglm(glm, str(root / "chatglm")),
            "glm4": build_glm(str(root / "glm4"), "glm4", seed=1)}


_REFS: dict[str, tuple[list[list[int]], list[list[int]]]] = {}


def _reference(dirs: dict[str, str], arch: str) -> tuple[list[list[int]], list[list[int]]]:
    """(16 prompts of 1..300 tokens, transformers' greedy continuations); chatglm's oracle is the
    GlmForCausalLM it was converted from."""
    import transformers

    src = "glm" if arch == "chatglm" else arch
    if src not in _REFS:
        hf = transformers.AutoModelForCausalLM.from_pretrained(dirs[src], dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        prompts = make_prompts(hf.config.vocab_size)
        _REFS[src] = (prompts, [hf_greedy(hf, p, MAX_TOKENS) for p in prompts])
    return _REFS[src]


def _assert_matches(finished: dict[str, Any], expected: list[list[int]]) -> None:
    assert len(finished) == len(expected)
    for i, ref in enumerate(expected):
        got = list(finished[str(i)].outputs[0].token_ids)
        assert got == ref, f"prompt {i}: {got} != {ref}"


def test_chatglm_config_read_by_our_adapter(dirs: dict[str, str]) -> None:
    cfg = load_hf_config(dirs["chatglm"])  # auto_map present: read as config.json, no remote code
    assert type(cfg).__name__ in ("PretrainedConfig", "PreTrainedConfig") and cfg.model_type == "chatglm"
    spec = ModelSpec.from_hf(cfg)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 4, 2, 32)
    assert spec.intermediate_size == 96 and spec.qkv_bias and not spec.o_bias and not spec.mlp_bias
    assert spec.rope is not None and not spec.rope.is_neox and spec.rope.partial_rotary_factor == 0.5
    assert spec.rope.theta == 20000.0 and spec.max_context_len == 2048
    assert spec.norm_eps == 1.5625e-07
    # the same numbers as the transformers config it was converted from
    glm = ModelSpec.from_hf(load_hf_config(dirs["glm"]))
    for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "vocab_size", "norm_eps", "rope", "qkv_bias", "o_bias"):
        assert getattr(spec, field) == getattr(glm, field), field


def test_chatglm_refuses_unsupported_variants(dirs: dict[str, str]) -> None:
    with open(os.path.join(dirs["chatglm"], "config.json")) as f:
        cfg = json.load(f)
    with pytest.raises(ValueError, match="post_layernorm"):
        ModelSpec.from_hf({**cfg, "apply_residual_connection_post_layernorm": True})
    with pytest.raises(ValueError, match="2D position"):
        ModelSpec.from_hf({**cfg, "position_encoding_2d": True})


_REMOTE_CONFIG = """
from transformers import PretrainedConfig

open(MARKER, "w").close()  # proof that this file was imported


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
"""


def test_checkpoint_code_runs_only_with_trust_remote_code(dirs: dict[str, str], tmp_path: Path) -> None:
    ckpt = tmp_path / "chatglm"
    shutil.copytree(dirs["chatglm"], ckpt)
    marker = tmp_path / "imported.marker"
    (ckpt / "configuration_chatglm.py").write_text(_REMOTE_CONFIG.replace("MARKER", repr(str(marker))))
    cfg = load_hf_config(str(ckpt))  # ours: config.json's keys, the checkpoint's file not run
    assert type(cfg).__name__ in ("PretrainedConfig", "PreTrainedConfig") and not marker.exists()
    remote = load_hf_config(str(ckpt), trust_remote_code=True)  # the checkpoint's own class
    assert marker.exists()
    assert type(remote).__name__ == "ChatGLMConfig"
    assert ModelSpec.from_hf(remote) == ModelSpec.from_hf(cfg)  # the adapter reads either


def test_sentencepiece_tokenizer_round_trips(dirs: dict[str, str]) -> None:
    engine = make_engine(dirs["chatglm"])
    tok = engine.get_tokenizer()  # ours, from tokenizer.model: no tokenization_chatglm.py ran
    assert isinstance(tok, ChatGLMTokenizer)
    n = tok.sp_model.get_piece_size()
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                "<|observation|>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(n, n + 9))  # published numbering
    assert tok.eos_token_id == tok.sp_model.eos_id() and tok.pad_token_id == tok.sp_model.unk_id()
    for text in ["Hello world, 123.", "über 汉字 emoji 🙂\n  two  spaces\tand a tab", " leading space"]:
        ids = tok.encode(text)
        assert ids[:2] == [n + 1, n + 3]  # [gMASK] sop
        assert ids[2:] == tok.sp_model.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids) == "[gMASK]sop" + text
    assert tok.decode([n + 20, 5]) == tok.decode([5])  # a padded-vocab id (model only) has no text
    # role tokens in text are single ids
    ids = tok.encode("<|user|>\n hi", add_special_tokens=False)
    assert ids[0] == n + 6 and n + 6 not in ids[1:]


def test_chatglm3_chat_format(dirs: dict[str, str]) -> None:
    tok = load_chatglm_tokenizer(dirs["chatglm"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("[gMASK]sop<|system|>\n Be brief.<|user|>\n Hi there<|assistant|>\n Hello."
                    "<|user|>\n Bye<|assistant|>")
    n = tok.sp_model.get_piece_size()
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:3] == [n + 1, n + 3, n + 5] and ids[-1] == n + 7
    assert [i for i in ids if i >= n] == [n + 1, n + 3, n + 5, n + 6, n + 7, n + 6, n + 7]
    # a template the checkpoint carries wins over ours
    with open(os.path.join(dirs["chatglm"], "tokenizer_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dirs["chatglm"], "tokenizer_config.json"), "w") as f:
        json.dump({**cfg, "chat_template": "{{ messages[0]['content'] }}!"}, f)
    try:
        assert load_chatglm_tokenizer(dirs["chatglm"]).apply_chat_template(
            messages, tokenize=False) == "Be brief.!"
    finally:
        with open(os.path.join(dirs["chatglm"], "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f)


def test_chatglm3_chat_through_the_engine(dirs: dict[str, str]) -> None:
    """LLM.chat renders ChatGLM3's format with our tokenizer; the reply decodes to text."""
    from pagedserve import LLM

    llm = LLM(dirs["chatglm"], dtype="float32", max_model_len=256, kv_cache_memory_bytes=8 << 20)
    tok = llm.get_tokenizer()
    n = tok.sp_model.get_piece_size()
    [out] = llm.chat([{"role": "user", "content": "Hello there"}], greedy(max_tokens=4), use_tqdm=False)
    assert list(out.prompt_token_ids) == [n + 1, n + 3, n + 6] + tok.sp_model.encode("\n Hello there") + [n + 7]
    assert len(out.outputs[0].token_ids) == 4
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_chatglm2_tokenizer_and_chat_format(dirs: dict[str, str], tmp_path: Path) -> None:
    # a ChatGLM2 tokenizer_config.json lists the five GLM tokens and no role tokens
    shutil.copy(os.path.join(dirs["chatglm"], "tokenizer.model"), tmp_path / "tokenizer.model")
    probe = load_chatglm_tokenizer(dirs["chatglm"])
    n = probe.sp_model.get_piece_size()
    added = {str(n + i): {"content": t, "special": True}
             for i, t in enumerate(["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"])}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    tok = load_chatglm_tokenizer(str(tmp_path))
    assert len(tok) == n + 5 and tok.convert_tokens_to_ids("sop") == n + 3
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "Again"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "[gMASK]sop[Round 1]\n\n问：你好\n\n答：Hi.\n\n[Round 2]\n\n问：Again\n\n答："
    assert tok.encode(text, add_special_tokens=False)[:2] == [n + 1, n + 3]
    # GLM-4's tokenizer.model is tiktoken's: refused, pointing at --trust-remote-code
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLM4Tokenizer"}))
    with pytest.raises(ValueError, match="trust-remote-code"):
        load_chatglm_tokenizer(str(tmp_path))


@pytest.mark.parametrize("arch", ["chatglm", "glm", "glm4"])
def test_greedy_matches_transformers_glm(arch: str, dirs: dict[str, str]) -> None:
    prompts, expected = _reference(dirs, arch)
    engine = make_engine(dirs[arch])
    _assert_matches(run_staggered(engine, prompts, greedy()), expected)


def test_chatglm_chunked_prefill(dirs: dict[str, str]) -> None:
    prompts, expected = _reference(dirs, "chatglm")
    engine = make_engine(dirs["chatglm"], max_num_batched_tokens=32)
    _assert_matches(run_staggered(engine, prompts, greedy(), per_step=4), expected)


def test_chatglm_prefix_caching(dirs: dict[str, str]) -> None:
    prompts, expected = _reference(dirs, "chatglm")
    engine = make_engine(dirs["chatglm"], enable_prefix_caching=True)
    # each prompt twice: the second copy hits the cached blocks of the first
    doubled = prompts + prompts
    _assert_matches(run_staggered(engine, doubled, greedy(), per_step=2), expected + expected)
    assert engine.get_stats().prefix_cache_hit_rate > 0.3


def test_chatglm_preemption(dirs: dict[str, str]) -> None:
    prompts, expected = _reference(dirs, "chatglm")
    engine = make_engine(dirs["chatglm"], num_gpu_blocks_override=24, max_model_len=320,
                         max_num_batched_tokens=64, preemption_mode="recompute",
                         enable_prefix_caching=False)
    _assert_matches(run_staggered(engine, prompts, greedy(), per_step=16), expected)
    stats = engine.get_stats()
    assert stats.last is not None and stats.last.num_preemptions > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["chatglm", "glm", "glm4"])
def test_gpu_greedy_matches_transformers_glm_with_cuda_graphs(arch: str, dirs: dict[str, str]) -> None:
    """Through the Triton kernels (interleaved partial rotary, fused rotary/KV write) and CUDA
    graph decode, float32."""
    import gc

    from pagedserve import LLM

    prompts, expected = _reference(dirs, arch)
    llm = LLM(dirs[arch], dtype="float32", max_model_len=512, max_num_seqs=16, enforce_eager=False,
              gpu_memory_utilization=0.3)
    assert llm.llm_engine.engine_core.runner.decode_graphs is not None
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected
    del llm
    gc.collect()
    torch.cuda.empty_cache()
