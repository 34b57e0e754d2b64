"""Small GGUF files for tests, written with gguf.GGUFWriter the way llama.cpp's converter writes them.

    write_gguf_from_hf(model, path)   a transformers llama / mistral / qwen2 / qwen3 model as GGUF:
                                      llama.cpp tensor names, Q/K rows permuted for "llama",
                                      2-D weights in `qtype` (norms and biases F32)
    random_block_bytes(qtype, rows, cols, seed)
                                      valid raw blocks of any quant type (for the K-quants, which
                                      the gguf package cannot quantize)
    write_tensors(path, tensors)      a GGUF holding just these (name, array or raw bytes, qtype)

The permutation is llama.cpp's (convert_hf_to_gguf.py `LlamaModel.permute`), written here from its
definition so that tests check gguf_loader.unpermute_rotary against an independent inverse.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["write_gguf_from_hf", "random_block_bytes", "write_tensors", "llama_cpp_permute"]

_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K permutation: per head, rows [x-half | y-half] -> interleaved (x0 y0 x1 y1 ...)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem in _HF_TO_GGUF_TOP:
        return f"{_HF_TO_GGUF_TOP[stem]}.{kind}"
    parts = stem.split(".")  # model.layers.N.<module path>
    return f"blk.{parts[2]}.{_HF_TO_GGUF_BLOCK['.'.join(parts[3:])]}.{kind}"


def random_block_bytes(qtype_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks, shape (rows, cols // block * bytes_per_block), uint8. Every byte is below
    0x3C, so every float16 scale inside a block (high byte < 0x3C) is finite and below 1."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype_name]]
    if cols % block:
        raise ValueError(f"cols ({cols}) must be a multiple of {qtype_name}'s block of {block}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, 0x3C, size=(rows, cols // block * size), dtype=np.uint8)


def write_tensors(path: str, tensors: Iterable[tuple[str, np.ndarray, str]], arch: str = "llama",
                  metadata: dict[str, Any] | None = None) -> str:
    """A GGUF file of (name, data, qtype name) tensors: float data is quantized to qtype with
    gguf.quants (F32 / F16 stored as is); uint8 data is taken as raw blocks of qtype."""
    import gguf

    writer = gguf.GGUFWriter(path, arch=arch)
    for key, value in (metadata or {}).items():
        getattr(writer, f"add_{key}")(value)
    for name, data, qtype_name in tensors:
        qtype = gguf.GGMLQuantizationType[qtype_name]
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=qtype)
        elif qtype_name == "F32":
            writer.add_tensor(name, data.astype(np.float32))
        elif qtype_name == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gguf_from_hf(model: Any, path: str, arch: str = "llama", qtype: str = "F32",
                       name: str = "tiny test model") -> str:
    """`model` (a transformers *ForCausalLM) as a GGUF file of architecture `arch`; `name` goes to
    general.name (transformers reads a llama-architecture file named "...mistral..." as Mistral)."""
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    meta: dict[str, Any] = {
        "name": name, "block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
        "head_count": n_heads, "head_count_kv": n_kv, "rope_dimension_count": head_dim,
        "layer_norm_rms_eps": float(cfg.rms_norm_eps), "rope_freq_base": float(rope.get("rope_theta", 10000.0)),
        "vocab_size": cfg.vocab_size,
        "key_length": head_dim, "value_length": head_dim,  # as llama.cpp writes a config's head_dim
    }
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        if "rotary_emb" in hf_name or (hf_name.startswith("lm_head") and cfg.tie_word_embeddings):
            continue
        w = tensor.detach().float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            w = llama_cpp_permute(w, n_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            w = llama_cpp_permute(w, n_kv)
        tensors.append((gguf_name(hf_name), w, qtype if w.ndim == 2 else "F32"))
    return write_tensors(path, tensors, arch=arch, metadata=meta)
