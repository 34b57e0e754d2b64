"""Build the Llama-3-8B-shaped benchmark checkpoint with random bf16 weights (nothing can be
downloaded on the GPU machine): config of Meta-Llama-3-8B, weights drawn on the GPU with the
config's initializer (std 0.02), saved as sharded safetensors next to a small BPE tokenizer.

    python -m benchmarks.build_model OUT_DIR
"""

from __future__ import annotations

import os
import sys
import time

import torch

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
    tie_word_embeddings=False,
)


def build(out_dir: str, **overrides: object) -> str:
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from pagedserve.testing.checkpoints import build_tokenizer

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer(out_dir, vocab_size=512, model_max_length=8192)
    config = LlamaConfig(**{**LLAMA3_8B, **overrides})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    print(f"built {out_dir} in {time.perf_counter() - started:.1f} s", flush=True)
    return out_dir


if __name__ == "__main__":
    build(sys.argv[1])
