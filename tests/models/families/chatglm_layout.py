"""Tiny GLM checkpoints for the ChatGLM family tests: a transformers GlmForCausalLM (the oracle),
saved as is (the native "glm" layout) and rewritten into the published ChatGLMModel layout
(config.json keys and tensor names of THUDM/chatglm3-6b), the inverse of transformers' GLM
conversion (convert_glm_weights_to_hf.py: query_key_value split into q/k/v_proj by
[heads * head_dim | groups * head_dim | groups * head_dim], the other names renamed)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from pagedserve.testing.checkpoints import build_tokenizer

# ChatGLM -> transformers GLM names (the conversion's order of substring replacements)
_TO_GLM = (
    ("transformer.output_layer.", "lm_head."),
    ("transformer.embedding.word_embeddings.", "model.embed_tokens."),
    ("transformer.encoder.final_layernorm.", "model.norm."),
    ("transformer.encoder.layers.", "model.layers."),
    (".self_attention.dense.", ".self_attn.o_proj."),
    (".mlp.dense_h_to_4h.", ".mlp.gate_up_proj."),
    (".mlp.dense_4h_to_h.", ".mlp.down_proj."),
)


def tiny_glm_config(arch: str, vocab_size: int) -> Any:
    """GlmConfig / Glm4Config: 4 heads of 32 over hidden 64 (head_dim != hidden / heads),
    2 multi-query groups, rotary over half of each head."""
    import transformers

    cls = {"glm": transformers.GlmConfig, "glm4": transformers.Glm4Config}[arch]
    return cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
               rms_norm_eps=1.5625e-07, attention_bias=True, initializer_range=0.2, bos_token_id=0,
               eos_token_id=1, pad_token_id=3, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * 2.0,
                                "partial_rotary_factor": 0.5})


def build_glm(out_dir: str, arch: str = "glm", seed: int = 0, vocab_size: int = 528) -> str:
    """A tiny random transformers GLM checkpoint (random biases and norm weights too); vocab_size
    is padded past the tokenizers' ids, as ChatGLM's padded_vocab_size is."""
    import transformers

    build_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_glm_config(arch, vocab_size))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
            elif "norm" in name:
                param.normal_(1.0, 0.2)
    model.config.dtype = torch.float32
    model.generation_config = transformers.GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=3)
    model.save_pretrained(out_dir)
    return out_dir


def glm_to_chatglm(glm_dir: str, out_dir: str) -> str:
    """Rewrite a tiny GlmForCausalLM checkpoint into the published ChatGLMModel layout."""
    from safetensors.torch import load_file, save_file

    with open(os.path.join(glm_dir, "config.json")) as f:
        cfg = json.load(f)
    heads, groups, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rope = cfg.get("rope_parameters") or {}
    assert rope.get("partial_rotary_factor", 0.5) == 0.5  # ChatGLM rotates half of each head
    state = load_file(os.path.join(glm_dir, "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        new = name
        for chatglm, glm in _TO_GLM:
            new = new.replace(glm, chatglm)
        if ".self_attn.q_proj." in new:  # fused back: [q | k | v] along the output dim
            k = state[name.replace(".q_proj.", ".k_proj.")]
            v = state[name.replace(".q_proj.", ".v_proj.")]
            new = new.replace(".self_attn.q_proj.", ".self_attention.query_key_value.")
            tensor = torch.cat([tensor, k, v], dim=0)
        elif ".self_attn.k_proj." in new or ".self_attn.v_proj." in new:
            continue
        out[new.replace(".self_attn.", ".self_attention.")] = tensor.contiguous()
    assert out["transformer.encoder.layers.0.self_attention.query_key_value.weight"].shape[0] == (
        (heads + 2 * groups) * head_dim)
    out["transformer.rotary_pos_emb.inv_freq"] = torch.zeros(head_dim // 4)  # as published: ignored
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    chatglm_cfg = {
        "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
        "ffn_hidden_size": cfg["intermediate_size"], "fp32_residual_connection": False,
        "hidden_dropout": 0.0, "hidden_size": cfg["hidden_size"], "kv_channels": head_dim,
        "layernorm_epsilon": cfg["rms_norm_eps"], "multi_query_attention": True,
        "multi_query_group_num": groups, "num_attention_heads": heads,
        "num_layers": cfg["num_hidden_layers"], "original_rope": True,
        "padded_vocab_size": cfg["vocab_size"], "post_layer_norm": True, "rmsnorm": True,
        "rope_ratio": rope["rope_theta"] / 10000.0, "seq_length": cfg["max_position_embeddings"],
        "use_cache": True, "torch_dtype": "float32", "tie_word_embeddings": False,
        "eos_token_id": 1, "pad_token_id": 3,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(chatglm_cfg, f, indent=2)
    shutil.copy(os.path.join(glm_dir, "generation_config.json"), os.path.join(out_dir, "generation_config.json"))
    write_sentencepiece_tokenizer(out_dir)
    return out_dir


def write_sentencepiece_tokenizer(out_dir: str, vocab_size: int = 512) -> None:
    """tokenizer.model (a SentencePiece BPE with byte fallback, trained on the synthetic corpus)
    and a tokenizer_config.json naming the remote ChatGLMTokenizer class, as published."""
    import io

    import sentencepiece as spm

    from pagedserve.testing.checkpoints import synthetic_corpus

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_corpus(2000)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "ChatGLMTokenizer", "remove_space": False, "do_lower_case": False,
                   "padding_side": "left", "clean_up_tokenization_spaces": False,
                   "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}, f)


# Mixed text the GLM-4 tiny BPE also learns from: numbers (split in runs of <= 3 digits), CJK,
# accents and emoji, so that multi-byte merges exist.
_GLM4_EXTRA_TEXT = ("In 2024 there were 12345 users and 678 servers; 3.14159 is pi.",
                    "你好，世界！我们今天学习汉字和标点。", "Über naïve café — emoji 🙂🚀 ok.")


def write_glm4_tokenizer(out_dir: str, num_merges: int = 240, chat_template: str | None = None) -> int:
    """GLM-4's published tokenizer files (THUDM/glm-4-9b-chat): tokenizer.model as a tiktoken BPE
    (base64 token, rank per line; a byte-level BPE trained here over GLM-4's split regex) and
    tokenizer_config.json naming the remote ChatGLM4Tokenizer, with its fourteen added tokens
    numbered after the ranks. Returns the number of ranks (the first special id)."""
    import base64

    from pagedserve.testing.checkpoints import synthetic_corpus
    from pagedserve.tokenizers.glm4_tiktoken import GLM4_PAT_STR, GLM4_SPECIAL_TOKENS
    from tests.models.families.published_layout import train_tiktoken_ranks

    ranks = train_tiktoken_ranks(synthetic_corpus(600) + list(_GLM4_EXTRA_TEXT) * 100, num_merges,
                                 pat_str=GLM4_PAT_STR)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in ranks.items()]
    with open(os.path.join(out_dir, "tokenizer.model"), "w") as f:
        f.write("\n".join(lines) + "\n")
    n = len(ranks)
    added = {str(n + i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True} for i, tok in enumerate(GLM4_SPECIAL_TOKENS)}
    cfg: dict[str, Any] = {
        "added_tokens_decoder": added, "additional_special_tokens": list(GLM4_SPECIAL_TOKENS),
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False, "do_lower_case": False, "eos_token": "<|endoftext|>",
        "model_max_length": 128000, "pad_token": "<|endoftext|>", "padding_side": "left",
        "remove_space": False, "tokenizer_class": "ChatGLM4Tokenizer"}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return n


def glm_to_glm4_chatglm(glm_dir: str, out_dir: str) -> str:
    """A tiny GlmForCausalLM checkpoint rewritten into GLM-4's published ChatGLMModel layout: the
    ChatGLM tensors and config keys, GLM-4's tiktoken tokenizer, and its stop ids (eos
    <|endoftext|>, <|user|>, <|observation|>) in config.json and generation_config.json."""
    glm_to_chatglm(glm_dir, out_dir)
    n = write_glm4_tokenizer(out_dir)
    eos = [n, n + 7, n + 9]
    for name, extra in (("config.json", {"_name_or_path": "THUDM/glm-4-9b-chat"}), ("generation_config.json", {})):
        with open(os.path.join(out_dir, name)) as f:
            cfg = json.load(f)
        cfg.update(extra, eos_token_id=eos, pad_token_id=n)
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(cfg, f, indent=2)
        assert name != "config.json" or cfg["padded_vocab_size"] >= n + 14  # the model holds every id
    return out_dir
