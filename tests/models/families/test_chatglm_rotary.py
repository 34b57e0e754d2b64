"""ChatGLM's rotary (interleaved pairs over the first half of each head) through the Triton
kernels against their torch twins, under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it),
at ChatGLM's head shape in miniature: 4 heads of 32, 2 multi-query groups, rot_dim 16."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels import reference as ref  # noqa: E402
from pagedserve.kernels.registry import TORCH_KERNELS, get_kernel_set  # noqa: E402
from pagedserve.model_executor.layers.context import BuildContext  # noqa: E402
from pagedserve.model_executor.layers.rotary import RotaryEmbedding  # noqa: E402
from pagedserve.model_executor.model_spec import ModelSpec  # noqa: E402

HEADS, GROUPS, HEAD_DIM = 4, 2, 32
CHATGLM = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": 1, "hidden_size": 64,
           "num_attention_heads": HEADS, "kv_channels": HEAD_DIM, "multi_query_attention": True,
           "multi_query_group_num": GROUPS, "ffn_hidden_size": 96, "padded_vocab_size": 64,
           "seq_length": 64, "layernorm_epsilon": 1e-5, "add_qkv_bias": True, "rope_ratio": 3.0}


def _rotary(kernels_name: str) -> RotaryEmbedding:
    spec = ModelSpec.from_hf(CHATGLM)
    assert spec.rope is not None
    kernels = TORCH_KERNELS if kernels_name == "torch" else get_kernel_set(kernels_name)
    return RotaryEmbedding(spec.head_dim, spec.max_position, spec.rope, ctx=BuildContext.create(kernels))


def test_chatglm_rotary_triton_matches_torch() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(7, HEADS * HEAD_DIM, generator=g)
    k = torch.randn(7, GROUPS * HEAD_DIM, generator=g)
    positions = torch.tensor([0, 1, 2, 17, 40, 63, 5])
    ours, twin = _rotary("triton"), _rotary("torch")
    assert ours.rot_dim == 16 and not ours.is_neox
    got_q, got_k = ours(positions, q.clone(), k.clone())
    want_q, want_k = twin(positions, q.clone(), k.clone())
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    # the second half of every head passes through untouched; the first half moved
    per_head = got_q.view(7, HEADS, HEAD_DIM)
    assert torch.equal(per_head[..., 16:], q.view(7, HEADS, HEAD_DIM)[..., 16:])
    assert not torch.allclose(per_head[1:, :, :16], q.view(7, HEADS, HEAD_DIM)[1:, :, :16])


def test_chatglm_fused_rotary_kv_write_triton_matches_torch() -> None:
    from pagedserve.kernels.triton.rotary import rotary_write_kv_cache

    g = torch.Generator().manual_seed(4)
    n = 5
    qkv = torch.randn(n, (HEADS + 2 * GROUPS) * HEAD_DIM, generator=g)
    cache = _rotary("torch").cos_sin_cache
    slots = torch.tensor([3, -1, 17, 0, 30])
    positions = torch.tensor([0, 9, 33, 2, 63])
    outs = []
    for fn in (rotary_write_kv_cache, ref.rotary_write_kv_cache):
        x = qkv.clone()
        q = x[:, : HEADS * HEAD_DIM].view(n, HEADS, HEAD_DIM)
        k = x[:, HEADS * HEAD_DIM: (HEADS + GROUPS) * HEAD_DIM].view(n, GROUPS, HEAD_DIM)
        v = x[:, (HEADS + GROUPS) * HEAD_DIM:].view(n, GROUPS, HEAD_DIM)
        kc = torch.zeros(2, 16, GROUPS, HEAD_DIM)
        vc = torch.zeros(2, 16, GROUPS, HEAD_DIM)
        fn(positions, q, k, v, cache, False, kc, vc, slots)
        outs.append((x, kc, vc))
    for got, want in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
