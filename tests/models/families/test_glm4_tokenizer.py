"""GLM-4 (THUDM/glm-4-9b-chat) in its published ChatGLMModel layout: its tiktoken tokenizer.model
is read by our loader (the checkpoint's tokenization_chatglm.py is never imported without
--trust-remote-code), round-trips text like an independent BPE over the same ranks, numbers its
special tokens as published and renders GLM-4's chat format; the tiny checkpoint generates
through pagedserve.LLM with it, greedy-equal to transformers' GlmForCausalLM on the same weights."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve.model_executor.family_tokenizers import load_family_tokenizer
from pagedserve.tokenizers.glm4_tiktoken import GLM4_PAT_STR, GLM4_SPECIAL_TOKENS, Glm4TiktokenTokenizer
from tests.engine.engine_helpers import greedy, hf_greedy
from tests.models.families.chatglm_layout import build_glm, glm_to_glm4_chatglm, write_glm4_tokenizer

TEXTS = ["Hello world, 123.", "In 2024 there were 12345 users; 3.14159!",
         "über 汉字 你好，世界 emoji 🙂🚀\n  two  spaces\tand a tab\r\n", " leading space", "",
         "it's we'll THEY'RE 9999999"]

# Imported only if checkpoint code ran: it leaves a marker file.
_REMOTE_TOKENIZER = "open(MARKER, 'w').close()\n"


@pytest.fixture(scope="module")
def glm4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("glm4")
    glm = build_glm(str(root / "glm"), "glm", seed=2)
    ckpt = glm_to_glm4_chatglm(glm, str(root / "glm-4-9b-chat-tiny"))
    marker = root / "imported.marker"
    Path(ckpt, "tokenization_chatglm.py").write_text(_REMOTE_TOKENIZER.replace("MARKER", repr(str(marker))))
    tok = load_family_tokenizer(ckpt, "chatglm")  # the dispatch the engine uses (model_type chatglm)
    assert isinstance(tok, Glm4TiktokenTokenizer)
    return {"glm": glm, "dir": ckpt, "tok": tok, "n": len(tok) - len(GLM4_SPECIAL_TOKENS), "marker": marker}


def test_round_trip_matches_an_independent_bpe(glm4: dict[str, Any]) -> None:
    """The same tokenizer.model through transformers' TikTokenConverter (tokenizers' Rust BPE and
    its default split, cl100k's = GLM-4's) gives the same ids; decode inverts encode."""
    import regex
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok: Glm4TiktokenTokenizer = glm4["tok"]
    n = glm4["n"]
    oracle = TikTokenConverter(vocab_file=os.path.join(glm4["dir"], "tokenizer.model")).converted()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[:2] == [n + 2, n + 4]  # [gMASK] <sop>
        assert ids[2:] == oracle.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids) == "[gMASK]<sop>" + text
        assert tok.encode(text, add_special_tokens=False) == ids[2:]
        # no token crosses a boundary of the split (digits in runs of at most three)
        cuts, pos = {0}, 0
        for i in ids[2:]:
            pos += len(tok._id_to_bytes[i])
            cuts.add(pos)
        for m in regex.finditer(GLM4_PAT_STR, text):
            assert len(m.group().encode()) == 0 or len(text[:m.end()].encode()) in cuts
    assert tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False)) == ["123", "45"]
    assert tok.decode([n + 14, n + 40, 72]) == "H"  # padded_vocab_size ids (model only) have no text


def test_special_tokens_map_to_published_ids(glm4: dict[str, Any], tmp_path: Path) -> None:
    tok: Glm4TiktokenTokenizer = glm4["tok"]
    n = glm4["n"]
    assert tok.convert_tokens_to_ids(list(GLM4_SPECIAL_TOKENS)) == list(range(n, n + 14))
    assert [tok.convert_tokens_to_ids(t) for t in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>",
                                                   "<|observation|>")] == [n + 2, n + 4, n + 7, n + 8, n + 9]
    assert tok.eos_token_id == tok.pad_token_id == n and tok.eos_token == "<|endoftext|>"
    assert tok.convert_ids_to_tokens(n + 6) == "<|system|>" and len(tok) == n + 14
    # special-token text is one id each (as the published added tokens are matched); skipped on request
    ids = tok.encode("<|user|>\nhi<|endoftext|>", add_special_tokens=False)
    assert ids[0] == n + 7 and ids[-1] == n and all(i < n for i in ids[1:-1])
    assert tok.decode(ids, skip_special_tokens=True) == "\nhi"
    # a tokenizer_config.json whose added tokens disagree with the ranks is refused
    shutil.copy(os.path.join(glm4["dir"], "tokenizer.model"), tmp_path / "tokenizer.model")
    bad = {"added_tokens_decoder": {str(n + 1): {"content": "<|endoftext|>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="numbers it"):
        Glm4TiktokenTokenizer.from_pretrained(str(tmp_path))


def test_chat_format_renders_as_published(glm4: dict[str, Any], tmp_path: Path) -> None:
    tok: Glm4TiktokenTokenizer = glm4["tok"]
    n = glm4["n"]
    chat = [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Who are you"},
            {"role": "assistant", "content": "   I am an assistant   "},
            {"role": "user", "content": "Another question"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ("[gMASK]<sop><|system|>\nYou are a helpful assistant<|user|>\nHello<|assistant|>\nHi there"
                    "<|user|>\nWho are you<|assistant|>\n   I am an assistant   <|user|>\nAnother question"
                    "<|assistant|>")
    ids = tok.apply_chat_template(chat, add_generation_prompt=True)
    assert isinstance(ids, list) and ids[:3] == [n + 2, n + 4, n + 6] and ids[-1] == n + 8
    assert [i for i in ids if i >= n] == [n + 2, n + 4, n + 6] + [n + 7, n + 8] * 3
    # no system message; without the generation prompt; a tool result with its metadata
    user = [{"role": "user", "content": "你好"}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "[gMASK]<sop><|user|>\n你好<|assistant|>")
    assert tok.apply_chat_template(user, tokenize=False) == "[gMASK]<sop><|user|>\n你好"
    tool = [*user, {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Beijing"}'},
            {"role": "observation", "content": '{"temp": 21}'}]
    assert tok.apply_chat_template(tool, tokenize=False, add_generation_prompt=True) == (
        '[gMASK]<sop><|user|>\n你好<|assistant|>get_weather\n{"city": "Beijing"}<|observation|>\n'
        '{"temp": 21}<|assistant|>')
    # a template the checkpoint carries wins over ours
    shutil.copy(os.path.join(glm4["dir"], "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    assert Glm4TiktokenTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        user, tokenize=False) == "你好!"


@pytest.fixture(scope="module")
def llm(glm4: dict[str, Any]) -> Any:
    from pagedserve import LLM

    return LLM(glm4["dir"], dtype="float32", max_model_len=256, kv_cache_memory_bytes=8 << 20)


def test_glm4_checkpoint_generates_through_llm(glm4: dict[str, Any], llm: Any) -> None:
    """LLM picks our GLM-4 tokenizer (the checkpoint's tokenization_chatglm.py not imported);
    chat and text prompts give transformers' greedy tokens on the GLM weights; GLM-4's stop ids
    come from generation_config.json."""
    import transformers

    tok: Glm4TiktokenTokenizer = glm4["tok"]
    n = glm4["n"]
    assert isinstance(llm.get_tokenizer(), Glm4TiktokenTokenizer) and not glm4["marker"].exists()
    builder = llm.llm_engine.request_builder
    assert builder.eos_token_id == n and sorted(builder.extra_eos_ids) == [n + 7, n + 9]
    hf = transformers.AutoModelForCausalLM.from_pretrained(glm4["glm"], dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there 12345"}]
    [chat] = llm.chat(messages, greedy(max_tokens=8), use_tqdm=False)
    assert list(chat.prompt_token_ids) == tok.apply_chat_template(messages, add_generation_prompt=True)
    assert list(chat.prompt_token_ids)[:3] == [n + 2, n + 4, n + 6]
    outs = llm.generate(TEXTS[:3], greedy(max_tokens=8), use_tqdm=False)
    for out in [chat, *outs]:
        prompt = list(out.prompt_token_ids)
        assert out.prompt is None or prompt == tok.encode(out.prompt, add_special_tokens=out is not chat)
        got = list(out.outputs[0].token_ids)
        assert got == hf_greedy(hf, prompt, 8)
        assert out.outputs[0].text == tok.decode(got, skip_special_tokens=True)


def test_structured_output_over_the_byte_vocabulary(llm: Any) -> None:
    """xgrammar reads the tokenizer as tiktoken's (tokens as raw bytes): choices whose characters
    span several byte tokens, and a regex, are followed exactly."""
    pytest.importorskip("xgrammar")
    from pagedserve import SamplingParams, StructuredOutputsParams

    choices = ["你好", "über", "12345 🙂"]
    for spec, check in ((StructuredOutputsParams(choice=choices), choices.__contains__),
                        (StructuredOutputsParams(regex=r"[a-c]{2,5}-\d{3}"),
                         lambda t: re.fullmatch(r"[a-c]{2,5}-\d{3}", t) is not None)):
        params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_outputs=spec, n=6)
        out = llm.generate("Hello 你好", params, use_tqdm=False)[0]
        got = [(o.text, o.finish_reason) for o in out.outputs]
        assert all(reason == "stop" and check(text) for text, reason in got), got


def test_checkpoint_tokenizer_code_runs_only_with_trust_remote_code(glm4: dict[str, Any]) -> None:
    """The engine's tokenizer loader: ours without trust_remote_code; with it, transformers imports
    the checkpoint's tokenization_chatglm.py (here a file that only leaves a marker, so the class
    it should define is then missing)."""
    from types import SimpleNamespace

    from pagedserve.engine.request_builder import load_tokenizer
    from pagedserve.model_executor.model_spec import load_hf_config

    def config(trust: bool) -> Any:
        model = SimpleNamespace(tokenizer=glm4["dir"], model_dir=glm4["dir"], trust_remote_code=trust,
                                hf_config=load_hf_config(glm4["dir"]),
                                model_spec=SimpleNamespace(model_type="chatglm"))
        return SimpleNamespace(model_config=model)

    assert isinstance(load_tokenizer(config(False)), Glm4TiktokenTokenizer) and not glm4["marker"].exists()
    with pytest.raises(Exception) as err:  # noqa: B017 - whatever transformers raises for the missing class
        load_tokenizer(config(True))
    assert "ChatGLM4Tokenizer" in str(err.value)
    assert glm4["marker"].exists()
    glm4["marker"].unlink()  # the other tests check that nothing imported it


def test_a_separate_tokenizer_directory_is_read_by_its_content(tmp_path: Path) -> None:
    from pagedserve.engine.request_builder import _own_tokenizer

    write_glm4_tokenizer(str(tmp_path))  # --tokenizer DIR holding only GLM-4's tokenizer files
    tok = _own_tokenizer(str(tmp_path), "chatglm", trust_remote_code=False)
    assert isinstance(tok, Glm4TiktokenTokenizer)
    assert tok.decode(tok.encode("the cat runs", add_special_tokens=False)) == "the cat runs"
