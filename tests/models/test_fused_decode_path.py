"""The small-batch decode path (RMSNorm folded into qkv / gate_up, SiLU-and-mul into gate_up,
plain GEMV for o_proj / down_proj) computes what the unfused path computes.

On the GPU the path runs the Triton GEMV; here the kernel set's slot is filled with its twin,
reference.fused_gemv_reference, so the wiring of the layers (which weights, norms, residuals go
where) is checked on CPU in float32."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from pagedserve.kernels import reference as ref
from pagedserve.kernels.registry import TORCH_KERNELS, GemvLimits
from pagedserve.model_executor.layers.decoder import DecoderLayer
from pagedserve.model_executor.loader import load_model
from tests.models.test_model_parity import PagedHarness

# plain GEMV and norm + GEMV up to 4 tokens, gate_up's SiLU fused only for 1: the 3-row decode
# steps take the fused norm with a separate SiLU-and-mul, the 1-row steps fuse everything
MAX_TOKENS, MAX_GATED_TOKENS = 4, 1
# the torch kernel set with the GEMV slot filled by its twin (the Triton set's shape, on CPU)
TWIN_KERNELS = dataclasses.replace(TORCH_KERNELS, name="torch+gemv-twin",
                                   fused_gemv=ref.fused_gemv_reference,
                                   gemv_limits=GemvLimits(MAX_TOKENS, MAX_TOKENS, MAX_GATED_TOKENS))


def _fused_layers(model: Any) -> int:
    """How many decoder layers fold both norms into qkv / gate_up (their methods accept)."""
    layers = 0
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            qkv, gate_up = module.self_attn.qkv_proj, module.mlp.gate_up_proj
            if all(p.linear_method.fused_max_tokens(gated=False) == MAX_TOKENS for p in (qkv, gate_up)):
                assert gate_up.linear_method.fused_max_tokens(gated=True) == MAX_GATED_TOKENS
                layers += 1
    return layers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # plain, QKV bias, q/k norm
def test_small_batch_path_matches_unfused(arch: str, tiny_checkpoints: Any) -> None:
    plain = load_model(tiny_checkpoints[arch], torch.float32, "cpu", show_progress=False).model
    fused = load_model(tiny_checkpoints[arch], torch.float32, "cpu", show_progress=False,
                       kernels=TWIN_KERNELS).model
    assert all(getattr(m, "fused_gemv", None) is None for m in plain.modules())  # torch set: off
    assert _fused_layers(plain) == 0
    assert _fused_layers(fused) == plain.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    prompts = {f"r{i}": torch.randint(5, 400, (n + 12,), generator=g).tolist()
               for i, n in enumerate((9, 20, 33))}
    runs = [PagedHarness(plain, seed=1), PagedHarness(fused, seed=1)]
    # prefill (more than MAX_TOKENS tokens: both unfused), then decode steps of 3 and 1 rows
    chunks = [[(r, t, 0, len(t) - 12) for r, t in prompts.items()]]
    for step in range(8):
        chunks.append([(r, t, len(t) - 12 + step, len(t) - 11 + step) for r, t in prompts.items()])
    chunks.append([("r1", prompts["r1"], len(prompts["r1"]) - 4, len(prompts["r1"]) - 3)])
    for chunk in chunks:
        want, got = (h.step(chunk) for h in runs)
        for req in want:
            torch.testing.assert_close(got[req], want[req], atol=1e-4, rtol=1e-4)
