"""ModelSpec: everything the engine needs from a Hugging Face config, read once, in our names.

    hf_config = load_hf_config(model_dir, trust_remote_code)    the one config object of the engine
    spec = ModelSpec.from_hf(hf_config)                         a frozen, torch-free value

This module is the only place that knows Hugging Face config attribute names (tests/models/
test_model_spec.py greps the package to keep it so). Models, the KV-cache spec and the
`max_model_len` derivation read `ModelSpec` fields only.

Families name the same quantity differently (ChatGLM: `num_layers`, `multi_query_group_num`,
`kv_channels`; Qwen v1: `kv_channels`, `rotary_pct`, `layer_norm_epsilon`), so each `model_type`
has a small adapter: a function from a `ConfigView` (uniform reads over a config object or a plain
config.json dict) to a `ModelSpec`. Adding a family = one adapter function + `@adapter("type")`.
The adapters for chatglm, qwen (v1) and baichuan are written from the published config.json key
names. Without trust_remote_code, a model_type transformers does not know (its class is remote
code) but an adapter does is read from config.json as a plain PretrainedConfig.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "CheckpointNames",
    "ConfigView",
    "ModelSpec",
    "RopeConfig",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "checkpoint_dtype",
    "layer_sliding_windows",
    "load_hf_config",
    "rope_from_hf",
]

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_DEFAULT_THETA = 10000.0
# Keys that give a model's context length, in the order they are trusted (generic fallback).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
_MISSING = object()


@dataclass(slots=True, frozen=True)
class RopeConfig:
    """Rotary settings. is_neox: rotate the two halves of the rotary dims (Llama, "half-rotated");
    False: rotate interleaved pairs (x0, x1), (x2, x3), ... (GPT-J / ChatGLM style)."""

    rope_type: str
    theta: float
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int | None = None  # llama3 (pre-training context)
    partial_rotary_factor: float = 1.0
    is_neox: bool = True


@dataclass(slots=True, frozen=True)
class CheckpointNames:
    """How checkpoint tensor names map onto our parameter names (the Llama layout:
    model.embed_tokens, model.layers.N.{input_layernorm,self_attn.{qkv_proj,o_proj},
    post_attention_layernorm,mlp.{gate_up_proj,down_proj}}, model.norm, lm_head).

    A name is first skipped if it contains an `ignored` substring, then rewritten by every
    `renames` (old, new) substring pair in order, then, if it contains a `stacked` checkpoint
    piece, loaded as that shard of the merged parameter. An already-fused checkpoint tensor
    (Qwen v1 `c_attn`, ChatGLM `query_key_value`) is a plain rename onto the merged parameter
    and loads whole."""

    renames: tuple[tuple[str, str], ...] = ()
    # (merged parameter piece, checkpoint piece, shard id)
    stacked: tuple[tuple[str, str, str | int], ...] = (
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
    )
    ignored: tuple[str, ...] = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

    def rename(self, name: str) -> str:
        for old, new in self.renames:
            name = name.replace(old, new)
        return name

    def num_shards(self, merged: str) -> int:
        """How many stacked checkpoint tensors make up the merged parameter piece `merged`."""
        return sum(1 for fused, _, _ in self.stacked if fused == merged)


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """A decoder-only model's shape and options, in our names (see module docstring)."""

    model_type: str
    architectures: tuple[str, ...]
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # of one gated-MLP branch (gate or up)
    vocab_size: int
    norm_eps: float
    max_position: int  # rows of the rotary cache (the position table the model was built for)
    max_context_len: int | None  # the context length the config promises (max_model_len default)
    rope: RopeConfig | None  # None: no rotary embedding (ALiBi)
    hidden_act: str = "silu"
    rms_norm: bool = True  # False: LayerNorm
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rotary (Qwen3)
    sliding_windows: tuple[int | None, ...] = ()  # one entry per layer
    tie_word_embeddings: bool = False
    alibi: bool = False
    norm_head: bool = False  # LM head rows L2-normalized before use (Baichuan2's NormHead)
    num_experts: int = 0  # routed experts per MoE layer; 0: dense MLP
    num_experts_per_tok: int = 0
    num_shared_experts: int = 0
    moe_intermediate_size: int | None = None  # of one routed expert's gate (or up) branch
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert; 0: none
    norm_topk_prob: bool = True  # renormalize the top-k router probabilities to sum to 1
    dense_mlp_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP instead
    dtype: str | None = None  # the checkpoint's dtype name ("bfloat16"), if the config gives one
    checkpoint_names: CheckpointNames = field(default_factory=CheckpointNames)
    # config.json's `quantization_config` as a dict (quantization/base.py reads it), if any
    quantization_config: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"sliding_windows has {len(self.sliding_windows)} entries, "
                             f"expected num_layers={self.num_layers}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if (self.rope is None) != self.alibi:
            raise ValueError("a model has exactly one of rotary embedding and ALiBi")

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelSpec:
        """The spec of a transformers config object (or a config.json dict), by its model_type."""
        view = ConfigView(hf_config)
        model_type = view.get("model_type")
        build = _ADAPTERS.get(model_type) if isinstance(model_type, str) else None
        if build is None:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: "
                             f"{sorted(_ADAPTERS)}")
        spec = build(view)
        quant = view.get("quantization_config")
        if quant is None:
            return spec
        if not isinstance(quant, Mapping):  # a transformers QuantizationConfigMixin object
            quant = quant.to_dict()
        return replace(spec, quantization_config=dict(quant))


class ConfigView:
    """Uniform reads over a config object (attributes) or a config.json dict (keys), with
    optional defaults for keys the config lacks (`with_defaults`)."""

    __slots__ = ("_config", "_defaults")

    def __init__(self, config: Any, defaults: Mapping[str, Any] | None = None) -> None:
        self._config = config
        self._defaults = dict(defaults or {})

    def get(self, key: str, default: Any = None) -> Any:
        """The value of `key`, `default` if absent (a present None stays None)."""
        if isinstance(self._config, Mapping):
            value = self._config.get(key, _MISSING)
        else:
            value = getattr(self._config, key, _MISSING)
        if value is _MISSING or (value is None and key in self._defaults):
            return self._defaults.get(key, default)
        return value

    def first(self, *keys: str, default: Any = None) -> Any:
        """The first of `keys` whose value is not None."""
        for key in keys:
            value = self.get(key)
            if value is not None:
                return value
        return default

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"model config ({self.get('model_type')!r}) has no {key!r}")
        return value

    def with_defaults(self, **defaults: Any) -> ConfigView:
        """A view where `defaults` fill the keys this config lacks (or holds as None)."""
        return ConfigView(self._config, {**self._defaults, **defaults})


Adapter = Callable[[ConfigView], ModelSpec]
_ADAPTERS: dict[str, Adapter] = {}


def adapter(*model_types: str) -> Callable[[Adapter], Adapter]:
    """Register an adapter for the given config.json `model_type` values."""
    def register(fn: Adapter) -> Adapter:
        for model_type in model_types:
            _ADAPTERS[model_type] = fn
        return fn
    return register


# ---------------------------------------------------------------- shared readers


def load_hf_config(model_dir: str, trust_remote_code: bool = False) -> Any:
    """The checkpoint's transformers config: read once per engine (config.py) and handed on.

    A config whose class is the checkpoint's own code (a model_type transformers does not know:
    Qwen v1, ChatGLM, Baichuan) is, without `trust_remote_code`, read from config.json into a plain
    `PretrainedConfig` (every key an attribute) for our adapter of its model_type: no checkpoint
    code runs. With `trust_remote_code` transformers builds the checkpoint's class."""
    from transformers import AutoConfig  # lazy: keeps this module torch-free

    if not trust_remote_code:
        plain = _remote_only_config(model_dir)
        if plain is not None:
            return plain
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def _remote_only_config(model_dir: str) -> Any:
    """A checkpoint whose model_type transformers does not know (its config class is remote
    code, `auto_map`) but one of our adapters does: config.json's keys as a plain
    `PretrainedConfig`, so nothing from the checkpoint runs. None for every other checkpoint."""
    import json
    import os

    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model_type = data.get("model_type")
    if model_type not in _ADAPTERS or model_type in CONFIG_MAPPING:
        return None
    return PretrainedConfig(**data)


def checkpoint_dtype(hf_config: Any) -> str | None:
    """The checkpoint's dtype name (`dtype`, or the older `torch_dtype`), e.g. "bfloat16"; a
    torch.dtype value is named without importing torch."""
    view = hf_config if isinstance(hf_config, ConfigView) else ConfigView(hf_config)
    value = view.get("dtype") or view.get("torch_dtype")
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def context_len(view: ConfigView, keys: tuple[str, ...] = _CONTEXT_KEYS) -> int | None:
    """The first positive int among `keys` (the config's context length), else None."""
    for key in keys:
        value = view.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def rope_from_hf(hf_config: Any) -> RopeConfig:
    """Rope settings the transformers-5 way (`rope_parameters` dict) or the older way
    (`rope_theta` + `rope_scaling` with `type` or `rope_type`). Unknown type -> ValueError."""
    return _rope(ConfigView(hf_config))


def _rope(view: ConfigView, *, theta: float | None = None, partial: float | None = None,
          is_neox: bool = True) -> RopeConfig:
    params: dict[str, Any] = dict(view.get("rope_parameters") or {})
    scaling = view.get("rope_scaling")
    if not params.get("rope_type") and isinstance(scaling, dict):
        params = {**scaling, **params}
    theta = theta or params.get("rope_theta") or view.get("rope_theta") or _DEFAULT_THETA
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {list(SUPPORTED_ROPE_TYPES)}, got {rope_type!r}")
    partial = partial or params.get("partial_rotary_factor") or view.get("partial_rotary_factor") or 1.0
    extra: dict[str, Any] = {}
    if rope_type != "default":
        if "factor" not in params:
            raise ValueError(f"rope scaling of type {rope_type!r} needs a 'factor'")
        extra["factor"] = float(params["factor"])
    if rope_type == "llama3":
        extra["low_freq_factor"] = float(params.get("low_freq_factor", 1.0))
        extra["high_freq_factor"] = float(params.get("high_freq_factor", 4.0))
        extra["original_max_position"] = int(params.get("original_max_position_embeddings")
                                             or view.require("max_position_embeddings"))
    return RopeConfig(rope_type=rope_type, theta=float(theta), partial_rotary_factor=float(partial),
                      is_neox=is_neox, **extra)


def layer_sliding_windows(hf_config: Any) -> list[int | None]:
    """Qwen2/Qwen3 semantics, as transformers applies them: `layer_types[i] ==
    "sliding_attention"` gets `sliding_window`; without layer_types, layers i >=
    max_window_layers slide when use_sliding_window is set."""
    view = hf_config if isinstance(hf_config, ConfigView) else ConfigView(hf_config)
    n = view.require("num_hidden_layers")
    window = view.get("sliding_window")
    layer_types = view.get("layer_types")
    if layer_types is None:
        if not view.get("use_sliding_window", False) or window is None:
            return [None] * n
        first = view.get("max_window_layers", 0)
        return [window if i >= first else None for i in range(n)]
    if len(layer_types) != n:
        raise ValueError(f"layer_types has {len(layer_types)} entries, expected num_hidden_layers={n}")
    if not view.get("use_sliding_window", True):
        window = None
    return [window if t == "sliding_attention" else None for t in layer_types]


def _architectures(view: ConfigView) -> tuple[str, ...]:
    return tuple(view.get("architectures") or ())


# ---------------------------------------------------------------- adapters: Llama layout


def _llama_like(view: ConfigView, **overrides: Any) -> ModelSpec:
    """Fields every Llama-layout config (llama, mistral, qwen2, qwen3) names the same way."""
    num_heads = view.require("num_attention_heads")
    hidden = view.require("hidden_size")
    num_layers = view.require("num_hidden_layers")
    fields: dict[str, Any] = dict(
        model_type=view.get("model_type"),
        architectures=_architectures(view),
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=view.get("num_key_value_heads") or num_heads,
        head_dim=view.get("head_dim") or hidden // num_heads,
        intermediate_size=view.require("intermediate_size"),
        vocab_size=view.require("vocab_size"),
        norm_eps=float(view.require("rms_norm_eps")),
        max_position=view.require("max_position_embeddings"),
        max_context_len=context_len(view),
        rope=_rope(view),
        hidden_act=view.get("hidden_act", "silu"),
        sliding_windows=(None,) * num_layers,
        tie_word_embeddings=bool(view.get("tie_word_embeddings", False)),
        dtype=checkpoint_dtype(view),
    )
    fields.update(overrides)
    return ModelSpec(**fields)


@adapter("llama")
def _llama(view: ConfigView) -> ModelSpec:
    bias = bool(view.get("attention_bias", False))
    return _llama_like(view, qkv_bias=bias, o_bias=bias, mlp_bias=bool(view.get("mlp_bias", False)))


@adapter("mistral")
def _mistral(view: ConfigView) -> ModelSpec:
    # One window (may be None) on every layer; transformers' Mistral has no projection biases.
    window = view.get("sliding_window")
    return _llama_like(view, sliding_windows=(window,) * view.require("num_hidden_layers"))


@adapter("qwen2")
def _qwen2(view: ConfigView) -> ModelSpec:
    # q/k/v biases always on, o_proj and MLP without.
    return _llama_like(view, qkv_bias=True,
                       sliding_windows=tuple(layer_sliding_windows(view)))


@adapter("qwen3")
def _qwen3(view: ConfigView) -> ModelSpec:
    bias = bool(view.get("attention_bias", False))
    return _llama_like(view, qkv_bias=bias, o_bias=bias, qk_norm=True,
                       sliding_windows=tuple(layer_sliding_windows(view)))


# ---------------------------------------------------------------- adapters: MoE, Llama layout
# Routed experts are checkpointed one tensor per expert and projection
# (`mlp.experts.E.{gate,up,down}_proj.weight`, Mixtral: `block_sparse_moe.experts.E.w1/w3/w2`);
# models/moe_base.py stacks them into [E, 2I, H] / [E, H, I] at load.

_MIXTRAL_NAMES = CheckpointNames(
    renames=((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
             (".w2.", ".down_proj.")),
)


@adapter("mixtral")
def _mixtral(view: ConfigView) -> ModelSpec:
    # MixtralTopKRouter always renormalizes the top-k probabilities.
    window = view.get("sliding_window")
    return _llama_like(view, sliding_windows=(window,) * view.require("num_hidden_layers"),
                       num_experts=view.require("num_local_experts"),
                       num_experts_per_tok=view.require("num_experts_per_tok"),
                       moe_intermediate_size=view.require("intermediate_size"),
                       norm_topk_prob=True, checkpoint_names=_MIXTRAL_NAMES)


@adapter("qwen2_moe", "qwen3_moe")
def _qwen_moe(view: ConfigView) -> ModelSpec:
    """Qwen2-MoE (q/k/v biases, one sigmoid-gated shared expert of
    shared_expert_intermediate_size) and Qwen3-MoE (q/k norms, no shared expert). Layer i has
    the dense MLP (intermediate_size) when it is in mlp_only_layers or (i + 1) is not a multiple
    of decoder_sparse_step, as transformers builds them; norm_topk_prob defaults to False there."""
    qwen3 = view.get("model_type") == "qwen3_moe"
    bias = bool(view.get("attention_bias", False)) if qwen3 else bool(view.get("qkv_bias", True))
    shared = view.get("shared_expert_intermediate_size") or 0
    num_layers = view.require("num_hidden_layers")
    mlp_only = set(view.get("mlp_only_layers") or ())
    step = view.get("decoder_sparse_step") or 1
    num_experts = view.require("num_experts")
    dense = tuple(i for i in range(num_layers)
                  if i in mlp_only or num_experts == 0 or (i + 1) % step != 0)
    return _llama_like(view, qkv_bias=bias, o_bias=bias and qwen3, qk_norm=qwen3,
                       sliding_windows=tuple(layer_sliding_windows(view)),
                       num_experts=num_experts,
                       num_experts_per_tok=view.require("num_experts_per_tok"),
                       num_shared_experts=1 if shared else 0,
                       shared_expert_intermediate_size=shared,
                       moe_intermediate_size=view.require("moe_intermediate_size"),
                       norm_topk_prob=bool(view.get("norm_topk_prob", False)),
                       dense_mlp_layers=dense)


# ---------------------------------------------------------------- adapters: other layouts
# Written from the published config.json / modeling files; no model class loads them yet.


_CHATGLM_NAMES = CheckpointNames(
    renames=(
        ("transformer.embedding.word_embeddings.", "model.embed_tokens."),
        ("transformer.encoder.layers.", "model.layers."),
        ("transformer.encoder.final_layernorm.", "model.norm."),
        ("transformer.output_layer.", "lm_head."),
        (".self_attention.query_key_value.", ".self_attn.qkv_proj."),  # fused q|k|v
        (".self_attention.dense.", ".self_attn.o_proj."),
        (".mlp.dense_h_to_4h.", ".mlp.gate_up_proj."),  # fused gate|up (swiglu chunks in order)
        (".mlp.dense_4h_to_h.", ".mlp.down_proj."),
    ),
    stacked=(),
    ignored=("rotary_pos_emb.inv_freq",),
)


@adapter("chatglm")
def _chatglm(view: ConfigView) -> ModelSpec:
    """ChatGLM2/ChatGLM3 (and GLM-4 chat checkpoints of the same layout), as their published
    modeling_chatglm.py computes: RMSNorm, q|k|v fused with bias (`add_qkv_bias`), multi-query
    groups, rotary over the first half of each head on interleaved pairs with base
    10000 * rope_ratio, swiglu over dense_h_to_4h's [gate | up] halves."""
    if view.get("position_encoding_2d") is not None:
        raise ValueError("ChatGLM-6B v1 (2D position encoding) is not supported; ChatGLM2/3 are")
    if view.get("apply_residual_connection_post_layernorm", False):
        raise ValueError("ChatGLM with apply_residual_connection_post_layernorm is not supported")
    if not view.get("post_layer_norm", True):
        raise ValueError("ChatGLM without a final layernorm (post_layer_norm=false) is not supported")
    num_heads = view.require("num_attention_heads")
    hidden = view.require("hidden_size")
    num_layers = view.require("num_layers")
    mqa = bool(view.get("multi_query_attention", False))
    linear_bias = bool(view.get("add_bias_linear", False))
    seq_length = view.require("seq_length")
    return ModelSpec(
        model_type="chatglm",
        architectures=_architectures(view),  # "ChatGLMModel" as published (registry.py maps it)
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=view.require("multi_query_group_num") if mqa else num_heads,
        head_dim=view.get("kv_channels") or hidden // num_heads,
        intermediate_size=view.require("ffn_hidden_size"),
        vocab_size=view.first("padded_vocab_size", "vocab_size"),
        norm_eps=float(view.get("layernorm_epsilon", 1e-5)),
        max_position=seq_length,
        max_context_len=seq_length,
        rope=_rope(view, theta=_DEFAULT_THETA * float(view.get("rope_ratio", 1.0)), partial=0.5,
                   is_neox=False),
        rms_norm=bool(view.get("rmsnorm", True)),
        qkv_bias=linear_bias or bool(view.get("add_qkv_bias", False)),
        o_bias=linear_bias,
        mlp_bias=linear_bias,
        sliding_windows=(None,) * num_layers,
        tie_word_embeddings=bool(view.get("tie_word_embeddings", False)),
        dtype=checkpoint_dtype(view),
        checkpoint_names=_CHATGLM_NAMES,
    )


_GLM_NAMES = CheckpointNames(stacked=CheckpointNames().stacked[:3])  # gate_up_proj is fused already


@adapter("glm", "glm4")
def _glm(view: ConfigView) -> ModelSpec:
    """transformers-native GLM (GlmForCausalLM) and GLM-4-0414 (Glm4ForCausalLM): ChatGLM's math in
    the Llama layout (q/k/v split, optional q/k/v bias, fused gate_up_proj, no o/MLP bias);
    rotary on interleaved pairs over partial_rotary_factor (default 0.5) of each head."""
    params: Mapping[str, Any] = view.get("rope_parameters") or {}
    partial = params.get("partial_rotary_factor") or view.get("partial_rotary_factor") or 0.5
    return _llama_like(view, qkv_bias=bool(view.get("attention_bias", True)),
                       rope=_rope(view, partial=float(partial), is_neox=False),
                       checkpoint_names=_GLM_NAMES)


_QWEN_V1_NAMES = CheckpointNames(
    renames=(
        ("transformer.wte.", "model.embed_tokens."),
        ("transformer.h.", "model.layers."),
        ("transformer.ln_f.", "model.norm."),
        (".ln_1.", ".input_layernorm."),
        (".ln_2.", ".post_attention_layernorm."),
        (".attn.c_attn.", ".self_attn.qkv_proj."),  # fused q|k|v
        (".attn.c_proj.", ".self_attn.o_proj."),
        (".mlp.c_proj.", ".mlp.down_proj."),
    ),
    # QWenMLP computes w1(x) * silu(w2(x)): w2 is the gate, w1 the up projection.
    stacked=((".mlp.gate_up_proj.", ".mlp.w2.", 0), (".mlp.gate_up_proj.", ".mlp.w1.", 1)),
)


@adapter("qwen")
def _qwen_v1(view: ConfigView) -> ModelSpec:
    """Qwen (v1, remote code): `intermediate_size` counts both MLP branches (w1 and w2 are each
    half of it); c_attn always has a bias, the other projections follow `no_bias`."""
    num_heads = view.require("num_attention_heads")
    hidden = view.require("hidden_size")
    num_layers = view.require("num_hidden_layers")
    no_bias = bool(view.get("no_bias", True))
    seq_length = view.first("seq_length", "max_position_embeddings")
    return ModelSpec(
        model_type="qwen",
        architectures=_architectures(view),
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=view.get("kv_channels") or hidden // num_heads,
        intermediate_size=view.require("intermediate_size") // 2,
        vocab_size=view.require("vocab_size"),
        norm_eps=float(view.get("layer_norm_epsilon", 1e-6)),
        max_position=view.first("max_position_embeddings", "seq_length"),
        max_context_len=seq_length,
        rope=_rope(view, theta=float(view.get("rotary_emb_base", _DEFAULT_THETA)),
                   partial=float(view.get("rotary_pct", 1.0))),
        qkv_bias=True,
        o_bias=not no_bias,
        mlp_bias=not no_bias,
        sliding_windows=(None,) * num_layers,
        tie_word_embeddings=bool(view.get("tie_word_embeddings", False)),
        dtype=checkpoint_dtype(view),
        checkpoint_names=_QWEN_V1_NAMES,
    )


_BAICHUAN_NAMES = CheckpointNames(
    renames=((".self_attn.W_pack.", ".self_attn.qkv_proj."),),  # fused q|k|v
    stacked=CheckpointNames().stacked[3:],  # gate_proj / up_proj as Llama
)


_BAICHUAN2_VOCAB = 125696


@adapter("baichuan")
def _baichuan(view: ConfigView) -> ModelSpec:
    """Baichuan / Baichuan2: the 7B models use rotary embedding, the 13B models ALiBi. The
    published 7B configs (hidden 4096) give `max_position_embeddings`, the 13B ones only
    `model_max_length`: rotary when either says 7B. Baichuan2 (its 125696-token vocabulary, or
    the `z_loss_weight` key only its configs carry) has the NormHead LM head. Packed W_pack
    q|k|v, otherwise the Llama layout."""
    alibi = view.require("hidden_size") != 4096 and view.get("max_position_embeddings") is None
    context = view.first("max_position_embeddings", "model_max_length")
    norm_head = view.get("vocab_size") == _BAICHUAN2_VOCAB or view.get("z_loss_weight") is not None
    return _llama_like(view.with_defaults(max_position_embeddings=context), alibi=alibi,
                       rope=None if alibi else _rope(view), max_context_len=context,
                       norm_head=norm_head, checkpoint_names=_BAICHUAN_NAMES)


SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ADAPTERS)


def complete_gguf_config(config: Any, head_dim: int | None, model_type_class: dict[str, str],
                         source: str) -> None:
    """Finish the transformers config read from a GGUF file's metadata (gguf_loader.py), in place:
    the per-head size the file states (transformers maps it for llama only and would leave qwen2 /
    qwen3 at their classes' defaults) and `architectures` from the model type, so the registry
    can pick the class. ValueError naming the model type when we build no class for it."""
    if head_dim is not None:
        config.head_dim = head_dim
    cls = model_type_class.get(config.model_type)
    if cls is None:
        raise ValueError(f"GGUF file {source!r} maps to model_type {config.model_type!r}, which is not "
                         f"supported; supported: {', '.join(model_type_class)}")
    config.architectures = [cls]
