"""Layers: rope parsing/scaling vs transformers, merged-linear weight loaders, kernel registry."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedserve.kernels import reference
from pagedserve.kernels.registry import get_kernel_set
from pagedserve.model_executor.layers.activation import get_gated_activation
from pagedserve.model_executor.layers.attention import (
    Attention,
    AttentionBackend,
    AttentionMetadata,
    dense_causal_attention,
)
from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.linear import Linear, MergedLinear, QKVLinear
from pagedserve.model_executor.layers.rotary import RotaryEmbedding, compute_inv_freq, get_rope_config
from pagedserve.model_executor.models import SUPPORTED_ARCHITECTURES, get_model_class
from pagedserve.model_executor.models.llama import layer_sliding_windows
from pagedserve.model_executor.models.qwen2 import Qwen2ForCausalLM

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
CTX = BuildContext.create(get_kernel_set("torch"))


def _hf_config(rope: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32, num_hidden_layers=1,
                       max_position_embeddings=2048, rope_parameters=dict(rope))


@pytest.mark.parametrize("rope", [LLAMA3, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}],
                         ids=["llama3", "linear"])
def test_inv_freq_matches_transformers(rope: dict[str, Any]) -> None:
    cfg = _hf_config(rope)
    expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
    ours, _ = compute_inv_freq(get_rope_config(cfg), 32, 2048)
    torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)


def test_rope_config_old_and_new_styles() -> None:
    new = get_rope_config(_hf_config(LLAMA3))
    assert (new.rope_type, new.theta, new.factor, new.original_max_position) == ("llama3", 500000.0, 8.0, 256)
    old = get_rope_config(SimpleNamespace(rope_theta=1e6, max_position_embeddings=4096,
                                          rope_scaling={"type": "linear", "factor": 2.0}))
    assert (old.rope_type, old.theta, old.factor) == ("linear", 1e6, 2.0)
    old3 = get_rope_config(SimpleNamespace(rope_theta=5e5, max_position_embeddings=4096,
                                           rope_scaling={**LLAMA3, "rope_theta": None}))
    assert (old3.rope_type, old3.theta, old3.high_freq_factor) == ("llama3", 5e5, 4.0)
    plain = get_rope_config(SimpleNamespace(max_position_embeddings=8))
    assert (plain.rope_type, plain.theta) == ("default", 10000.0)
    dyn = get_rope_config(SimpleNamespace(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    inv, length = compute_inv_freq(dyn, 16, 100)
    assert length == 200 and inv[1] < 1.0 / 10000.0 ** (2 / 16)  # stretched base
    with pytest.raises(ValueError, match="rope_type must be one of .*'foo'"):
        get_rope_config(SimpleNamespace(rope_scaling={"type": "foo", "factor": 2.0}))
    with pytest.raises(ValueError, match="needs a 'factor'"):
        get_rope_config(SimpleNamespace(rope_parameters={"rope_type": "linear"}))


def test_rotary_cache_matches_transformers_cos_sin() -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = _hf_config(LLAMA3)
    rope = RotaryEmbedding(32, 2048, get_rope_config(cfg), ctx=CTX)
    pos = torch.tensor([[0, 1, 255, 256, 2047]])
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), pos)
    cache = rope.cos_sin_cache[pos[0]]
    torch.testing.assert_close(cache[:, :16], cos[0, :, :16], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[:, 16:], sin[0, :, :16], atol=1e-6, rtol=0)


def test_merged_linear_weight_loaders() -> None:
    qkv: Any = QKVLinear(hidden_size=6, head_dim=2, num_heads=4, num_kv_heads=1, bias=True, ctx=CTX)
    assert qkv.weight.shape == (12, 6) and qkv.bias is not None
    parts = {"q": torch.full((8, 6), 1.0), "k": torch.full((2, 6), 2.0), "v": torch.full((2, 6), 3.0)}
    for sid, t in parts.items():
        qkv.weight.weight_loader(qkv.weight, t, sid)
        qkv.bias.weight_loader(qkv.bias, t[:, 0], sid)
    assert torch.equal(qkv.weight, torch.cat(list(parts.values())))
    q, k, v = qkv.split(qkv(torch.ones(3, 6)))
    assert q.shape == (3, 8) and k.shape == (3, 2) and v.shape == (3, 2)
    assert torch.all(k == 2 * 6 + 2) and torch.all(v == 3 * 6 + 3)
    with pytest.raises(ValueError, match="does not fit"):
        qkv.weight.weight_loader(qkv.weight, torch.zeros(8, 6), "k")
    with pytest.raises(ValueError, match="shard_id must be one of"):
        qkv.weight.weight_loader(qkv.weight, torch.zeros(2, 6), "x")

    gate_up: Any = MergedLinear(3, [4, 4], ctx=CTX)
    assert gate_up.bias is None
    gate_up.weight.weight_loader(gate_up.weight, torch.ones(4, 3), 1)
    gate_up.weight.weight_loader(gate_up.weight, torch.zeros(4, 3), 0)
    assert gate_up.weight[:4].sum() == 0 and gate_up.weight[4:].sum() == 12
    plain: Any = Linear(3, 2, ctx=CTX)
    plain.weight.weight_loader(plain.weight, torch.eye(2, 3))
    assert torch.equal(plain(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[1.0, 2.0]]))


def test_attention_backend_registry() -> None:
    assert get_kernel_set("torch").attention.attend is reference.paged_attention
    with pytest.raises(ValueError, match="attn_backend must be one of .*'torch'.*got 'nope'"):
        get_kernel_set("nope")
    calls: list[dict[str, Any]] = []

    def attend(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs)
        return reference.paged_attention(*args)

    counting = AttentionBackend("counting", reference.write_kv_cache, attend, accepts_max_lens=True)
    layer = Attention(2, 4, 1, 0.5, BuildContext.create(get_kernel_set("torch"), attention=counting))
    kc, vc = torch.zeros(2, 4, 1, 4), torch.zeros(2, 4, 1, 4)
    md = AttentionMetadata(torch.tensor([5, 6]), torch.tensor([0, 2], dtype=torch.int32),
                           torch.tensor([2], dtype=torch.int32),
                           torch.tensor([[1]], dtype=torch.int32), 2, 2)
    out = layer(torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 4), (kc, vc), md)
    assert out.shape == (2, 8) and calls == [{"max_query_len": 2, "max_seq_len": 2}]
    assert kc[1, 1:3].abs().sum() > 0 and kc[0].abs().sum() == 0  # slots 5, 6 = block 1


@pytest.mark.parametrize("window", [None, 3])
def test_dense_fallback_matches_reference(window: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(13, 4, 8, generator=g), torch.randn(13, 2, 8, generator=g), torch.randn(13, 2, 8, generator=g)
    qsl = torch.tensor([0, 6, 7, 12], dtype=torch.int32)  # row 12 is padding
    out = dense_causal_attention(q, k, v, qsl, 0.3, window)
    expected = reference.varlen_causal_attention(q, k, v, qsl, 0.3, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(out[12] == 0)


def test_registry_and_flags() -> None:
    assert get_model_class(["Foo", "Qwen2ForCausalLM"]) is Qwen2ForCausalLM
    assert set(SUPPORTED_ARCHITECTURES) == {"LlamaForCausalLM", "MistralForCausalLM",
                                            "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                            "BaichuanForCausalLM", "BaiChuanForCausalLM",
                                            "QWenLMHeadModel", "MixtralForCausalLM",
                                            "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                                            "ChatGLMModel", "ChatGLMForConditionalGeneration",
                                            "GlmForCausalLM", "Glm4ForCausalLM"}
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported"):
        get_model_class(["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="hidden_act"):
        get_gated_activation("gelu", ctx=CTX)
    # Qwen2 semantics without layer_types: layers >= max_window_layers slide, if enabled
    cfg = SimpleNamespace(num_hidden_layers=4, use_sliding_window=True, sliding_window=32,
                          max_window_layers=2)
    assert layer_sliding_windows(cfg) == [None, None, 32, 32]
    cfg.use_sliding_window = False
    assert layer_sliding_windows(cfg) == [None] * 4
    with pytest.raises(ValueError, match="num_attention_heads .* multiple"):
        Attention(6, 8, 4, 1.0, CTX)
