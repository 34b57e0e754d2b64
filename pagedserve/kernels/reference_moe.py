"""Plain-torch mixture-of-experts twins (the "torch" kernel set's `fused_moe`, and the oracle of
kernels/triton/fused_moe.py).

    x [T, H], w13 [E, 2I, H] (rows 0..I = gate, I..2I = up), w2 [E, H, I],
    topk_weights [T, K] (float32), topk_ids [T, K] (int64)
    out[t] = sum_k topk_weights[t, k] * w2[e] @ (silu(w13[e, :I] @ x[t]) * w13[e, I:] @ x[t]),
             e = topk_ids[t, k]

Computed expert by expert over the tokens routed to it (experts with no token are skipped), in
the input dtype, each expert's weighted output added in the order of the experts, as
transformers' MoE blocks do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_moe"]


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
    """See module docstring; returns [T, H] in x's dtype."""
    num_experts = w13.shape[0]
    out = torch.zeros_like(x)
    if x.shape[0] == 0:
        return out
    counts = torch.bincount(topk_ids.flatten(), minlength=num_experts).tolist()
    for e, n in enumerate(counts):
        if n == 0:
            continue
        token_idx, k_idx = torch.where(topk_ids == e)
        gate, up = F.linear(x[token_idx], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        y = y * topk_weights[token_idx, k_idx, None].to(y.dtype)
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out
