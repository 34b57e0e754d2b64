"""Tiny, real Hugging Face checkpoints for tests and the demo model (no downloads needed).

A checkpoint directory holds what a hub snapshot holds: config.json, model.safetensors (or shards
+ model.safetensors.index.json), generation_config.json, tokenizer.json, tokenizer_config.json
(with a chat template) and special_tokens_map.json. Weights are random (seeded) through
`transformers`, so the same library is the correctness oracle in tests.

Only stable public APIs of transformers 5.x are used (config classes, from_config,
save_pretrained, GenerationConfig) and of `tokenizers` (BPE trainer).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHS",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "build_checkpoint",
    "build_demo_checkpoint",
    "synthetic_corpus",
]

ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Order fixes the ids: <s>=0, </s>=1, <unk>=2, <pad>=3, then the role tokens.
SPECIAL_TOKENS = (BOS, EOS, UNK, PAD, *ROLE_TOKENS)

# <s><|system|>\n...</s>\n<|user|>\n...</s>\n<|assistant|>\n   (content may be a string or a list
# of OpenAI-style {"type": "text", "text": ...} parts; other part types are dropped).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_WORDS = (
    "the a an this that some every one two three many few model token engine cache block page "
    "request server client batch queue memory kernel layer head query key value attention "
    "scheduler prefix sequence prompt answer question story river mountain city garden house "
    "cat dog bird tree light water fire stone cloud morning evening night friend teacher child "
    "runs reads writes finds keeps sends makes takes gives sees knows wants likes builds moves "
    "quickly slowly quietly often never always again together here there today tomorrow "
    "small large quick lazy bright dark warm cold new old green blue red happy careful simple"
).split()
_NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Paris", "London", "Tokyo", "Monday", "Friday")


def synthetic_corpus(num_sentences: int = 4000, seed: int = 1234) -> list[str]:
    """Deterministic English-like sentences with names, numbers and punctuation."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(num_sentences):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.4:
            words.insert(rng.randrange(len(words)), rng.choice(_NAMES))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2048)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice((".", ".", "!", "?", ","))
        lines.append(sentence)
    return lines


def build_tokenizer(out_dir: str, vocab_size: int = 512, model_max_length: int = 2048) -> None:
    """Train a byte-level BPE on the synthetic corpus and save it so AutoTokenizer loads it.

    Special tokens get ids 0.. in SPECIAL_TOKENS order; encoding prepends <s> (Llama-style).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
                   "additional_special_tokens": list(ROLE_TOKENS)}
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "model_max_length": model_max_length,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special_map)


def _tiny_config_kwargs(arch: str, vocab_size: int) -> tuple[str, dict[str, Any]]:
    """(config class name, kwargs) of the tiny model for `arch`.

    head_dim 32 with hidden 64 and 4 heads, so head_dim != hidden / heads (catches code that
    derives it); 2 KV heads (GQA) except llama3, which uses 1 (MQA).
    """
    base: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=0, eos_token_id=1, pad_token_id=3,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if arch == "llama":
        return "LlamaConfig", base
    if arch == "llama3":
        base.update(
            num_key_value_heads=1, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 256},
        )
        return "LlamaConfig", base
    if arch == "mistral":
        base.update(sliding_window=64)
        return "MistralConfig", base
    if arch == "qwen2":
        # Sliding window on layers >= max_window_layers (= layer 1 only), as transformers applies it.
        base.update(use_sliding_window=True, sliding_window=48, max_window_layers=1)
        return "Qwen2Config", base
    if arch == "qwen3":
        base.update(tie_word_embeddings=True, attention_bias=False)
        return "Qwen3Config", base
    raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")


def build_checkpoint(out_dir: str, arch: str, *, dtype: str = "float32", seed: int = 0,
                     num_shards: int = 1, tokenizer_vocab_size: int = 512,
                     **config_overrides: Any) -> str:
    """Build a tiny random checkpoint of `arch` (one of ARCHS) into out_dir; returns out_dir.

    config_overrides replace entries of the tiny config (e.g. attention_bias=True, mlp_bias=True).
    num_shards > 1 saves safetensors shards plus model.safetensors.index.json.
    """
    import torch
    import transformers

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer(out_dir, vocab_size=tokenizer_vocab_size)
    with open(os.path.join(out_dir, "tokenizer.json")) as f:
        vocab_size = len(json.load(f)["model"]["vocab"])

    cls_name, kwargs = _tiny_config_kwargs(arch, vocab_size)
    kwargs.update(config_overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomize_biases_and_norms(model, std=kwargs["initializer_range"])
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype  # recorded in config.json ("dtype")
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    save_kwargs: dict[str, Any] = {}
    if num_shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        save_kwargs["max_shard_size"] = max(1, total // num_shards)
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir


def _randomize_biases_and_norms(model: Any, std: float) -> None:
    """transformers initialises biases to 0 and norm weights to 1, which would let a test miss a
    bias or norm weight loaded into the wrong place; make them random too (seeded by the caller)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, std)
            elif "norm" in name:
                param.normal_(1.0, 0.2)


def _demo_config() -> dict[str, Any]:
    return dict(
        vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=3,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


_DEMO_VERSION = "1"


def build_demo_checkpoint(cache_dir: str | None = None) -> str:
    """The built-in demo model (llama-shaped, ~4M params, random weights), built once and reused.

    Lives in <cache_dir or $PAGEDSERVE_CACHE or ~/.cache/pagedserve>/demo-model. Built into a
    temporary sibling directory and renamed into place, so a crash or a concurrent builder never
    leaves a half-written model behind.
    """
    import torch
    import transformers

    root = Path(cache_dir or os.environ.get("PAGEDSERVE_CACHE")
                or Path.home() / ".cache" / "pagedserve")
    target = root / "demo-model"
    stamp = target / "pagedserve_demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == _DEMO_VERSION:
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        kwargs = _demo_config()
        build_tokenizer(str(tmp), vocab_size=kwargs["vocab_size"],
                        model_max_length=kwargs["max_position_embeddings"])
        config = transformers.LlamaConfig(**kwargs)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.generation_config = transformers.GenerationConfig(bos_token_id=0, eos_token_id=1,
                                                                pad_token_id=3)
        model.save_pretrained(str(tmp))
        _write_json(str(tmp / "pagedserve_demo.json"), {"version": _DEMO_VERSION})
        if target.exists():  # stale version: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not stamp.is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
