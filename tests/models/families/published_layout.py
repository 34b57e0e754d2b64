"""Tiny checkpoints in a family's *published* (remote-code) layout, and their transformers oracles.

transformers has no Qwen-v1 class, so the oracle is the same weights remapped into the equivalent
native model. Qwen v1 -> Qwen2ForCausalLM:

    transformer.wte                  -> model.embed_tokens
    h.N.ln_1 / ln_2                  -> layers.N.input_layernorm / post_attention_layernorm
    h.N.attn.c_attn [3D, D] (+bias)  -> q_proj / k_proj / v_proj = rows [0:D], [D:2D], [2D:3D]
    h.N.attn.c_proj (no bias)        -> o_proj
    h.N.mlp.w2 / w1 / c_proj         -> gate_proj / up_proj / down_proj
                                        (QWenMLP: c_proj(w1(x) * silu(w2(x))); Qwen2MLP:
                                         down(act(gate(x)) * up(x)): gate = w2, up = w1)
    transformer.ln_f                 -> model.norm
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from pagedserve.testing.checkpoints import synthetic_corpus
from pagedserve.tokenizers.qwen_tiktoken import QWEN_PAT_STR, QWEN_SPECIAL_TOKENS, TIKTOKEN_FILE

__all__ = ["qwen1_config", "qwen1_to_qwen2", "train_tiktoken_ranks", "write_qwen1_checkpoint"]


def train_tiktoken_ranks(texts: list[str], num_merges: int, pat_str: str = QWEN_PAT_STR) -> dict[bytes, int]:
    """A byte-level BPE in tiktoken's form: the 256 bytes (rank = byte value), then `num_merges`
    merges in the order learned (most frequent adjacent pair over the pre-split pieces first;
    ties broken by the pair's bytes, so the result is deterministic)."""
    import regex

    pieces = Counter(m.encode("utf-8") for text in texts for m in regex.findall(pat_str, text))
    words: dict[tuple[bytes, ...], int] = {tuple(bytes([b]) for b in w): n for w, n in pieces.items()}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(num_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        new_words: dict[tuple[bytes, ...], int] = {}
        for word, n in words.items():
            out: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    return ranks


def qwen1_config(vocab_size: int, *, hidden: int = 64, heads: int = 4, layers: int = 2,
                 mlp: int = 96, seq_length: int = 512) -> dict[str, Any]:
    """config.json with the published Qwen-7B-Chat keys (auto_map included: remote code)."""
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False,
        "fp32": False, "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": 2 * mlp,  # both branches, as published (22016 for 2 x 11008)
        "kv_channels": hidden // heads, "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": seq_length, "model_type": "qwen", "no_bias": True,
        "num_attention_heads": heads, "num_hidden_layers": layers, "onnx_safe": None,
        "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True,
        "seq_length": seq_length, "softmax_in_fp32": False, "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0", "use_cache": True,
        "use_cache_kernel": False, "use_cache_quantization": False, "use_dynamic_ntk": True,
        "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": vocab_size,
    }


def _qwen1_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d, v, m = config["hidden_size"], config["vocab_size"], config["intermediate_size"] // 2

    def rand(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm() -> torch.Tensor:
        return 1.0 + rand(d, std=0.1)

    weights = {"transformer.wte.weight": rand(v, d, std=0.5), "transformer.ln_f.weight": norm(),
               "lm_head.weight": rand(v, d, std=0.2)}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        weights |= {
            p + "ln_1.weight": norm(),
            p + "attn.c_attn.weight": rand(3 * d, d), p + "attn.c_attn.bias": rand(3 * d, std=0.2),
            p + "attn.c_proj.weight": rand(d, d),
            p + "ln_2.weight": norm(),
            p + "mlp.w1.weight": rand(m, d), p + "mlp.w2.weight": rand(m, d),
            p + "mlp.c_proj.weight": rand(d, m),
        }
    return weights


def write_qwen1_checkpoint(out_dir: str | Path, *, num_merges: int = 300, seed: int = 0) -> Path:
    """A Qwen-7B-Chat-layout directory: config.json, model.safetensors (published tensor names),
    qwen.tiktoken, tokenizer_config.json and generation_config.json as published (no template)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = train_tiktoken_ranks(synthetic_corpus(600), num_merges)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in ranks.items()]
    (out / TIKTOKEN_FILE).write_text("\n".join(lines) + "\n")
    n_vocab = len(ranks) + len(QWEN_SPECIAL_TOKENS)
    config = qwen1_config(vocab_size=(n_vocab + 63) // 64 * 64)  # padded, as 151936 > 151851
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": config["seq_length"], "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    eod = len(ranks)  # <|endoftext|>
    (out / "generation_config.json").write_text(json.dumps({
        "chat_format": "chatml", "eos_token_id": eod, "pad_token_id": eod, "max_window_size": 6144}))
    save_file({k: t.contiguous() for k, t in _qwen1_weights(config, seed).items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def qwen1_to_qwen2(model_dir: str | Path) -> Any:
    """The transformers Qwen2ForCausalLM (float32, eval) holding the checkpoint's weights."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = json.loads((Path(model_dir) / "config.json").read_text())
    d = src["hidden_size"]
    hf_config = Qwen2Config(
        vocab_size=src["vocab_size"], hidden_size=d, intermediate_size=src["intermediate_size"] // 2,
        num_hidden_layers=src["num_hidden_layers"], num_attention_heads=src["num_attention_heads"],
        num_key_value_heads=src["num_attention_heads"], rms_norm_eps=src["layer_norm_epsilon"],
        max_position_embeddings=src["seq_length"], tie_word_embeddings=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(src["rotary_emb_base"])},
        hidden_act="silu")
    w = load_file(str(Path(model_dir) / "model.safetensors"))
    state = {"model.embed_tokens.weight": w["transformer.wte.weight"],
             "model.norm.weight": w["transformer.ln_f.weight"], "lm_head.weight": w["lm_head.weight"]}
    for i in range(src["num_hidden_layers"]):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        qw, kw, vw = w[p + "attn.c_attn.weight"].split(d, dim=0)
        qb, kb, vb = w[p + "attn.c_attn.bias"].split(d, dim=0)
        state |= {
            q + "input_layernorm.weight": w[p + "ln_1.weight"],
            q + "self_attn.q_proj.weight": qw, q + "self_attn.q_proj.bias": qb,
            q + "self_attn.k_proj.weight": kw, q + "self_attn.k_proj.bias": kb,
            q + "self_attn.v_proj.weight": vw, q + "self_attn.v_proj.bias": vb,
            q + "self_attn.o_proj.weight": w[p + "attn.c_proj.weight"],
            q + "post_attention_layernorm.weight": w[p + "ln_2.weight"],
            q + "mlp.gate_proj.weight": w[p + "mlp.w2.weight"],
            q + "mlp.up_proj.weight": w[p + "mlp.w1.weight"],
            q + "mlp.down_proj.weight": w[p + "mlp.c_proj.weight"],
        }
    model = Qwen2ForCausalLM(hf_config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model
