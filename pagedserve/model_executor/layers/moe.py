"""Mixture-of-experts MLP block for DecoderLayer (Mixtral, Qwen2-MoE, Qwen3-MoE).

    mlp(hidden, residual, norm) -> (out, residual)      (the DecoderLayer MLP contract)

    h = norm(hidden + residual)                          [T, H]
    router_logits = gate(h)                              [T, E]
    topk_weights, topk_ids = top-k of softmax(logits)    [T, K] float32 / int64, renormalized to
                                                         sum 1 when spec.norm_topk_prob
    out = fused_moe(h, experts.gate_up_proj, experts.down_proj, topk_weights, topk_ids)
    Qwen2-MoE adds sigmoid(shared_expert_gate(h)) * shared_expert(h).

Expert weights are stacked: experts.gate_up_proj [E, 2I, H] (rows 0..I gate, I..2I up) and
experts.down_proj [E, H, I]; the checkpoint's per-expert tensors are copied into their slices by
`FusedMoE.weight_loader` (shard id (expert, "gate" | "up" | "down")), an already stacked tensor
(transformers' own in-memory layout) loads whole. The routed-expert kernel is the kernel set's
`fused_moe` (the torch twin or the Triton kernel), bound at construction.

Tensor parallel: like the dense MLP, every expert's intermediate dim is split over the ranks
(rank r holds gate/up rows and down columns r*I/tp .. (r+1)*I/tp of every expert) and the
routed output is all-reduced; router and shared-expert gate are replicated, the shared expert is
a GatedMLP (column / row parallel). No expert parallelism. Quantized MoE checkpoints are refused.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import GatedMLP
from pagedserve.model_executor.layers.linear import ReplicatedLinear, set_weight_attrs
from pagedserve.model_executor.model_spec import ModelSpec

__all__ = ["FusedMoE", "SparseMoeBlock", "route_topk"]

ExpertShard = tuple[int, str]  # (expert index, "gate" | "up" | "down")


def route_topk(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """router_logits [T, E] -> (topk_weights [T, K] float32, topk_ids [T, K] int64): softmax in
    float32, the K largest probabilities (torch.topk order), divided by their sum when
    `renormalize` (Mixtral always; the Qwen MoEs when norm_topk_prob), as transformers' routers."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """The routed experts, stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I] (uninitialised
    until loaded). forward(h [T, H], topk_weights, topk_ids) -> [T, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *,
                 ctx: BuildContext) -> None:
        super().__init__()
        if ctx.quant_config is not None:
            raise ValueError(f"{ctx.prefix}: quantized mixture-of-experts checkpoints are not supported")
        group = ctx.parallel
        if intermediate_size % group.world_size:
            raise ValueError(f"{ctx.prefix}: the experts' intermediate size ({intermediate_size}) must "
                             f"be divisible by the tensor-parallel size ({group.world_size})")
        self.num_experts = num_experts
        self.local_inter = local = intermediate_size // group.world_size
        self._first = group.rank * local  # this rank's slice of every expert's intermediate dim
        self._comm = group.comm
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, local), requires_grad=False)
        for param in (self.gate_up_proj, self.down_proj):
            set_weight_attrs(param, {"weight_loader": self.weight_loader})
        self._fused_moe = ctx.kernels.fused_moe  # bound once

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: ExpertShard | None = None) -> None:
        """Copy this rank's slice of one expert's gate / up ([I, H]) or down ([H, I]) tensor into
        the stacked parameter; shard_id None: a whole stacked tensor ([E, 2I, H] or [E, H, I])."""
        rows = slice(self._first, self._first + self.local_inter)
        local = self.local_inter
        if shard_id is None:
            if param is self.down_proj:
                pieces = [(param.data, loaded[..., rows])]
            else:
                gate, up = loaded.chunk(2, dim=1)
                pieces = [(param.data[:, :local], gate[:, rows]), (param.data[:, local:], up[:, rows])]
        else:
            expert, part = shard_id
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"expert {expert} is outside 0..{self.num_experts - 1}")
            if part == "gate":
                pieces = [(param.data[expert, :local], loaded[rows])]
            elif part == "up":
                pieces = [(param.data[expert, local:], loaded[rows])]
            elif part == "down":
                pieces = [(param.data[expert], loaded[:, rows])]
            else:
                raise ValueError(f"expert shard must be gate, up or down, got {part!r}")
        for target, piece in pieces:
            if target.shape != piece.shape:
                raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit expert "
                                 f"shard {shard_id!r} (this rank's slice {tuple(target.shape)})")
            target.copy_(piece)

    def forward(self, h: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        out = cast(Tensor, self._fused_moe(h, self.gate_up_proj, self.down_proj, topk_weights, topk_ids))
        # each rank summed over its slice of the intermediate dim: the all-reduce completes it
        return self._comm.all_reduce(out) if self._comm is not None else out


class SparseMoeBlock(nn.Module):
    """norm, router (`gate`, no bias), routed experts, optional sigmoid-gated shared expert."""

    def __init__(self, spec: ModelSpec, *, ctx: BuildContext) -> None:
        super().__init__()
        assert spec.moe_intermediate_size is not None and spec.num_experts > 0
        self.top_k = spec.num_experts_per_tok
        self.renormalize = spec.norm_topk_prob
        self.gate = ReplicatedLinear(spec.hidden_size, spec.num_experts, bias=False, ctx=ctx.child("gate"))
        self.experts = FusedMoE(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size,
                                ctx=ctx.child("experts"))
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: ReplicatedLinear | None = None
        if spec.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(spec.hidden_size, spec.shared_expert_intermediate_size,
                                          False, spec.hidden_act, ctx=ctx.child("shared_expert"))
            self.shared_expert_gate = ReplicatedLinear(spec.hidden_size, 1, bias=False,
                                                       ctx=ctx.child("shared_expert_gate"))

    def route(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [T, H] (normed) -> (router_logits [T, E], topk_weights [T, K] float32, topk_ids [T, K])."""
        logits = cast(Tensor, self.gate(h))
        weights, ids = route_topk(logits, self.top_k, self.renormalize)
        return logits, weights, ids

    def forward(self, hidden: Tensor, residual: Tensor | None,
                norm: nn.Module) -> tuple[Tensor, Tensor]:
        if residual is None:
            h, residual = cast(Tensor, norm(hidden)), hidden
        else:
            h, residual = cast(tuple[Tensor, Tensor], norm(hidden, residual))
        _, weights, ids = self.route(h)
        out = cast(Tensor, self.experts(h, weights, ids))
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            shared = self.shared_expert
            act = shared.act_fn(shared.gate_up_proj(h))
            gate = torch.sigmoid(cast(Tensor, self.shared_expert_gate(h)))  # [T, 1]
            out = out + gate * shared.down_proj(act)
        return out, residual
