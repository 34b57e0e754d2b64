"""ModelSpec: exact fields against the tiny HF configs (and the modules transformers builds from
them), the published ChatGLM2/3 and Qwen v1 config.json layouts field by field, their checkpoint
name maps, one config read per engine with one trust_remote_code, and no HF config names read
outside model_spec.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoConfig

import pagedserve
from pagedserve.config import EngineArgs, _derive_max_model_len
from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.model_spec import ModelSpec, RopeConfig
from pagedserve.model_executor.models.llama import LlamaForCausalLM
from pagedserve.testing.checkpoints import ARCHS
from pagedserve.worker.kv_cache import KVCacheSpec


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_fields_equal_hf_config(arch: str, tiny_checkpoints: Any) -> None:
    cfg = AutoConfig.from_pretrained(tiny_checkpoints[arch])
    spec = ModelSpec.from_hf(cfg)
    assert (spec.model_type, spec.architectures) == (cfg.model_type, tuple(cfg.architectures))
    assert spec.num_layers == cfg.num_hidden_layers
    assert spec.hidden_size == cfg.hidden_size
    assert spec.num_heads == cfg.num_attention_heads
    assert spec.num_kv_heads == cfg.num_key_value_heads
    assert spec.head_dim == cfg.head_dim  # 32 != hidden / heads in the tiny models
    assert spec.intermediate_size == cfg.intermediate_size
    assert spec.vocab_size == cfg.vocab_size
    assert spec.norm_eps == cfg.rms_norm_eps
    assert spec.max_position == spec.max_context_len == cfg.max_position_embeddings
    assert spec.tie_word_embeddings == cfg.tie_word_embeddings
    assert spec.hidden_act == cfg.hidden_act
    assert spec.dtype == "float32"
    assert not spec.alibi and spec.num_experts == 0
    rope = cfg.rope_parameters
    assert spec.rope is not None
    assert (spec.rope.rope_type, spec.rope.theta, spec.rope.is_neox) == (rope["rope_type"], rope["rope_theta"], True)
    assert spec.rope.partial_rotary_factor == 1.0
    if rope["rope_type"] == "llama3":
        assert (spec.rope.factor, spec.rope.low_freq_factor, spec.rope.high_freq_factor,
                spec.rope.original_max_position) == (rope["factor"], rope["low_freq_factor"],
                                                     rope["high_freq_factor"],
                                                     rope["original_max_position_embeddings"])
    # Sliding windows as transformers' config states them per layer.
    if arch == "mistral":
        expected = (cfg.sliding_window,) * cfg.num_hidden_layers
    elif arch in ("qwen2", "qwen3") and cfg.use_sliding_window:
        expected = tuple(cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types)
    else:
        expected = (None,) * cfg.num_hidden_layers
    assert spec.sliding_windows == expected
    if arch == "qwen2":
        assert spec.sliding_windows == (None, 48)  # the tiny config: layer 1 slides
    # Biases and q/k norms as the transformers modules built from this config have them.
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    attn, mlp = hf.model.layers[0].self_attn, hf.model.layers[0].mlp
    assert spec.qkv_bias == (attn.q_proj.bias is not None) == (attn.k_proj.bias is not None)
    assert spec.o_bias == (attn.o_proj.bias is not None)
    assert spec.mlp_bias == (mlp.gate_proj.bias is not None)
    assert spec.qk_norm == hasattr(attn, "q_norm")


def test_spec_follows_bias_overrides() -> None:
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                   intermediate_size=96, attention_bias=True, mlp_bias=True)
    spec = ModelSpec.from_hf(cfg)
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias, spec.head_dim, spec.num_kv_heads) == (True, True, True, 16, 4)
    assert ModelSpec.from_hf(cfg.to_dict()) == spec  # a config.json dict reads the same


# Published config.json of THUDM/chatglm3-6b (the keys a ChatGLM2/3 config has).
CHATGLM3_6B: dict[str, Any] = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False,
    "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 13696,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096,
    "kv_channels": 128, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 28, "original_rope": True,
    "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True, "seq_length": 8192,
    "use_cache": True, "torch_dtype": "float16", "tie_word_embeddings": False,
    "eos_token_id": 2, "pad_token_id": 0,
}


def test_chatglm3_adapter_field_by_field() -> None:
    spec = ModelSpec.from_hf(CHATGLM3_6B)
    assert spec.model_type == "chatglm" and spec.architectures == ("ChatGLMModel",)
    assert spec.num_layers == 28  # num_layers, not num_hidden_layers
    assert spec.hidden_size == 4096
    assert spec.num_heads == 32
    assert spec.num_kv_heads == 2  # multi_query_group_num
    assert spec.head_dim == 128  # kv_channels
    assert spec.intermediate_size == 13696  # ffn_hidden_size (dense_h_to_4h is 2x this)
    assert spec.vocab_size == 65024  # padded_vocab_size
    assert spec.norm_eps == 1e-5 and spec.rms_norm  # layernorm_epsilon, rmsnorm
    assert spec.max_position == spec.max_context_len == 8192  # seq_length
    assert spec.rope == RopeConfig("default", 10000.0, partial_rotary_factor=0.5, is_neox=False)
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias) == (True, False, False)
    assert spec.sliding_windows == (None,) * 28
    assert not spec.tie_word_embeddings and not spec.alibi and spec.dtype == "float16"
    kv = KVCacheSpec.from_model_spec(spec, 16, torch.float16)
    assert (kv.num_layers, kv.num_kv_heads, kv.head_dim) == (28, 2, 128)
    assert kv.bytes_per_block == 2 * 28 * 16 * 2 * 128 * 2
    assert _derive_max_model_len(spec.max_context_len, None) == 8192
    # chatglm3-6b-32k: rope_ratio scales the base; without multi-query attention every head has KV.
    long = ModelSpec.from_hf({**CHATGLM3_6B, "rope_ratio": 50, "seq_length": 32768,
                              "multi_query_attention": False})
    assert long.rope is not None and long.rope.theta == 500000.0
    assert (long.num_kv_heads, long.max_context_len) == (32, 32768)
    with pytest.raises(ValueError, match="v1"):
        ModelSpec.from_hf({**CHATGLM3_6B, "position_encoding_2d": True})


# Published config.json of Qwen/Qwen-7B (remote-code Qwen v1).
QWEN_7B: dict[str, Any] = {
    "model_type": "qwen", "architectures": ["QWenLMHeadModel"], "attn_dropout_prob": 0.0,
    "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False, "hidden_size": 4096,
    "intermediate_size": 22016, "initializer_range": 0.02, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 32768, "no_bias": True,
    "num_attention_heads": 32, "num_hidden_layers": 32, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 8192,
    "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer", "use_cache": True,
    "use_dynamic_ntk": True, "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 151936,
}


def test_qwen_v1_adapter_field_by_field() -> None:
    spec = ModelSpec.from_hf(QWEN_7B)
    assert spec.model_type == "qwen" and spec.architectures == ("QWenLMHeadModel",)
    assert spec.num_layers == 32
    assert spec.hidden_size == 4096
    assert spec.num_heads == spec.num_kv_heads == 32
    assert spec.head_dim == 128  # kv_channels
    assert spec.intermediate_size == 11008  # 22016 / 2: w1 and w2 are each half
    assert spec.vocab_size == 151936
    assert spec.norm_eps == 1e-6 and spec.rms_norm  # layer_norm_epsilon
    assert spec.max_context_len == 8192  # seq_length (dynamic NTK beyond it is not implemented)
    assert spec.max_position == 32768
    assert spec.rope == RopeConfig("default", 10000.0, partial_rotary_factor=1.0, is_neox=True)
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias) == (True, False, False)  # c_attn always has one
    assert spec.sliding_windows == (None,) * 32 and not spec.tie_word_embeddings
    part = ModelSpec.from_hf({**QWEN_7B, "rotary_pct": 0.5, "rotary_emb_base": 1000000, "no_bias": False})
    assert part.rope is not None and (part.rope.partial_rotary_factor, part.rope.theta) == (0.5, 1e6)
    assert (part.qkv_bias, part.o_bias, part.mlp_bias) == (True, True, True)


def test_baichuan_alibi_and_rope() -> None:
    base = {"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "hidden_size": 5120,
            "intermediate_size": 13696, "num_attention_heads": 40, "num_hidden_layers": 40,
            "rms_norm_eps": 1e-6, "model_max_length": 4096, "vocab_size": 125696,
            "hidden_act": "silu", "tie_word_embeddings": False}
    big = ModelSpec.from_hf(base)  # Baichuan2-13B: ALiBi, no rotary
    assert big.alibi and big.rope is None and (big.head_dim, big.max_context_len) == (128, 4096)
    small = ModelSpec.from_hf({**base, "hidden_size": 4096, "num_attention_heads": 32,
                               "num_hidden_layers": 32, "intermediate_size": 11008})
    assert not small.alibi and small.rope is not None and small.rope.theta == 10000.0
    with pytest.raises(ValueError, match="rotary"):
        LlamaForCausalLM(None, spec=big, ctx=BuildContext.create())  # the Llama decoder refuses a spec it cannot run


def test_unknown_model_type_is_refused() -> None:
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelSpec.from_hf({"model_type": "gpt2"})


def _tiny(spec: ModelSpec) -> LlamaForCausalLM:
    with torch.device("cpu"):
        return LlamaForCausalLM(None, spec=spec, ctx=BuildContext.create())


def _load_named(model: LlamaForCausalLM, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
    loaded = model.load_weights(tensors.items())
    assert loaded == set(dict(model.named_parameters()))  # every parameter, from published names
    return tensors


def test_chatglm_checkpoint_names_cover_the_model() -> None:
    cfg = {**CHATGLM3_6B, "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
           "multi_query_group_num": 2, "kv_channels": 16, "ffn_hidden_size": 96,
           "padded_vocab_size": 128, "seq_length": 256}
    spec = ModelSpec.from_hf(cfg)
    qkv = (4 + 2 * 2) * 16
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (128, 64),
        "transformer.rotary_pos_emb.inv_freq": (4,),
        "transformer.encoder.final_layernorm.weight": (64,),
        "transformer.output_layer.weight": (128, 64),
    }
    for i in range(2):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (64,), p + "post_attention_layernorm.weight": (64,),
                   p + "self_attention.query_key_value.weight": (qkv, 64),
                   p + "self_attention.query_key_value.bias": (qkv,),
                   p + "self_attention.dense.weight": (64, 64),
                   p + "mlp.dense_h_to_4h.weight": (192, 64), p + "mlp.dense_4h_to_h.weight": (64, 96)}
    model = _tiny(spec)
    tensors = _load_named(model, shapes)
    layer = model.model.layers[1]
    assert torch.equal(layer.mlp.gate_up_proj.weight, tensors["transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"])
    assert torch.equal(layer.self_attn.qkv_proj.bias,
                       tensors["transformer.encoder.layers.1.self_attention.query_key_value.bias"])
    assert torch.equal(model.lm_head.weight, tensors["transformer.output_layer.weight"])


def test_qwen_v1_checkpoint_names_cover_the_model() -> None:
    cfg = {**QWEN_7B, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
           "kv_channels": 16, "intermediate_size": 192, "vocab_size": 128, "seq_length": 256,
           "max_position_embeddings": 256}
    spec = ModelSpec.from_hf(cfg)
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (128, 64), "transformer.ln_f.weight": (64,),
                                          "lm_head.weight": (128, 64)}
    for i in range(2):
        p = f"transformer.h.{i}."
        shapes |= {p + "ln_1.weight": (64,), p + "ln_2.weight": (64,),
                   p + "attn.c_attn.weight": (192, 64), p + "attn.c_attn.bias": (192,),
                   p + "attn.c_proj.weight": (64, 64), p + "mlp.w1.weight": (96, 64),
                   p + "mlp.w2.weight": (96, 64), p + "mlp.c_proj.weight": (64, 96)}
    model = _tiny(spec)
    tensors = _load_named(model, shapes)
    gate_up = model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(gate_up[:96], tensors["transformer.h.0.mlp.w2.weight"])  # the gate: silu(w2 x)
    assert torch.equal(gate_up[96:], tensors["transformer.h.0.mlp.w1.weight"])
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, tensors["transformer.h.0.attn.c_attn.weight"])


def test_one_config_read_and_trust_remote_code_everywhere(tiny_checkpoints: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedserve.engine.request_builder import load_tokenizer
    from pagedserve.worker.model_runner import ModelRunner

    config_calls: list[bool] = []
    tokenizer_calls: list[bool] = []
    real_config, real_tokenizer = AutoConfig.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def count_config(*args: Any, **kwargs: Any) -> Any:
        config_calls.append(kwargs.get("trust_remote_code", False))
        return real_config(*args, **kwargs)

    def count_tokenizer(*args: Any, **kwargs: Any) -> Any:
        tokenizer_calls.append(kwargs.get("trust_remote_code", False))
        return real_tokenizer(*args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", count_config)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", count_tokenizer)
    config = EngineArgs(model=tiny_checkpoints["qwen3"], trust_remote_code=True, device="cpu",
                        max_model_len=256, kv_cache_memory_bytes=1 << 20).create_engine_config()
    runner = ModelRunner(config)
    load_tokenizer(config)
    assert config_calls == [True]  # the loader builds from the engine's config, never re-reads it
    assert tokenizer_calls == [True]
    assert runner.hf_config is config.model_config.hf_config
    assert runner.model.spec is runner.model_spec is config.model_config.model_spec
    assert (runner.spec.num_layers, runner.spec.num_kv_heads, runner.spec.head_dim) == (2, 2, 32)
    assert runner.vocab_size == config.model_config.hf_config.vocab_size


# Hugging Face config attribute names (Llama layout and the other families' spellings). Outside
# model_spec.py the package must not read them from a config; allowed exceptions:
#   - testing/checkpoints.py writes HF configs (it is where the tiny checkpoints come from);
#   - `self.config = config` in the model class (kept, unread, as transformers models keep it).
_HF_NAMES = (
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
    "intermediate_size", "rms_norm_eps", "vocab_size", "max_position_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "partial_rotary_factor", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "hidden_act", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "torch_dtype", "dtype", "architectures", "model_type",
    "num_layers", "multi_query_group_num", "kv_channels", "ffn_hidden_size", "padded_vocab_size",
    "seq_length", "layernorm_epsilon", "layer_norm_epsilon", "rotary_pct", "rotary_emb_base",
    "n_positions", "max_seq_len", "num_experts", "num_local_experts", "num_experts_per_tok",
)
_ALLOWED_FILES = {"model_executor/model_spec.py", "testing/checkpoints.py", "testing/gguf_files.py"}
_NAMES = "|".join(_HF_NAMES)
# config.NAME / hf_config.NAME / cfg.NAME, and getattr(<anything>config<anything>, ...)
_PATTERNS = (
    re.compile(rf"\b(?:hf_config|config|hf_cfg)\.(?:{_NAMES})\b"),
    re.compile(r"getattr\(\s*\w*(?:config|cfg)\w*\s*,"),
    re.compile(rf"getattr\([^,()]+,\s*[\"'](?:{_NAMES})[\"']"),
)


def test_no_hf_config_names_outside_model_spec() -> None:
    root = Path(pagedserve.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in _ALLOWED_FILES:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in _PATTERNS):
                offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert offenders == []
    # the patterns do catch the old reads (so the test can fail)
    assert all(any(p.search(s) for p in _PATTERNS) for s in (
        "n = config.num_hidden_layers", 'getattr(hf_config, "head_dim", None)',
        'x = getattr(cfg, "rope_theta", None)', "hf_config.vocab_size"))


def test_moe_fields() -> None:
    # Published config.json values of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B.
    mixtral = ModelSpec.from_hf({
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
        "max_position_embeddings": 32768, "vocab_size": 32000, "tie_word_embeddings": False})
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.num_shared_experts,
            mixtral.moe_intermediate_size) == (8, 2, 0, 14336)
    assert mixtral.rope is not None and mixtral.rope.theta == 1e6 and mixtral.head_dim == 128
    qwen3_moe = ModelSpec.from_hf({
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48, "num_experts": 128,
        "num_experts_per_tok": 8, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "max_position_embeddings": 40960, "vocab_size": 151936, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": False})
    assert (qwen3_moe.num_experts, qwen3_moe.num_experts_per_tok, qwen3_moe.num_shared_experts,
            qwen3_moe.moe_intermediate_size, qwen3_moe.qk_norm) == (128, 8, 0, 768, True)
    qwen2_moe = ModelSpec.from_hf({
        "model_type": "qwen2_moe", "hidden_size": 3584, "intermediate_size": 18944,
        "moe_intermediate_size": 2560, "shared_expert_intermediate_size": 20480,
        "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
        "num_experts": 64, "num_experts_per_tok": 8, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "vocab_size": 151936})
    assert (qwen2_moe.num_shared_experts, qwen2_moe.qkv_bias, qwen2_moe.o_bias) == (1, True, False)
    with pytest.raises(ValueError, match="dense MLP"):
        LlamaForCausalLM(None, spec=mixtral, ctx=BuildContext.create())
