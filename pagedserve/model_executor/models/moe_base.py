"""The shared skeleton of the mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): the
dense rotary attention, a SparseMoeBlock (layers/moe.py) as the MLP of every layer except
spec.dense_mlp_layers (those keep the GatedMLP of intermediate_size), and a load_weights that
stacks the per-expert checkpoint tensors:

    model.layers.N.mlp.experts.E.gate_proj.weight [I, H] -> mlp.experts.gate_up_proj[E, :I]
    model.layers.N.mlp.experts.E.up_proj.weight   [I, H] -> mlp.experts.gate_up_proj[E, I:]
    model.layers.N.mlp.experts.E.down_proj.weight [H, I] -> mlp.experts.down_proj[E]

(after the spec's renames: Mixtral's block_sparse_moe.experts.E.w1/w3/w2). Every other tensor
goes through the generic DecoderForCausalLM.load_weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import cast

import torch
from torch import Tensor, nn

from pagedserve.model_executor.layers.context import BuildContext
from pagedserve.model_executor.layers.decoder import DecoderLayer, GatedMLP, RopeAttention
from pagedserve.model_executor.layers.moe import FusedMoE, SparseMoeBlock
from pagedserve.model_executor.layers.rotary import RotaryEmbedding
from pagedserve.model_executor.model_spec import ModelSpec
from pagedserve.model_executor.models.base import DecoderForCausalLM

__all__ = ["MoEDecoderForCausalLM"]

_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\."
                     r"(?P<part>gate|up|down)_proj\.weight$")


class MoEDecoderForCausalLM(DecoderForCausalLM):
    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        if spec.rope is None or not spec.rms_norm or not spec.num_experts:
            raise ValueError(f"the {cls.__name__} decoder needs rotary embedding, RMSNorm and "
                             f"num_experts > 0; model_type {spec.model_type!r} has alibi={spec.alibi}, "
                             f"rms_norm={spec.rms_norm}, num_experts={spec.num_experts}")
        if spec.num_experts_per_tok < 1 or spec.num_experts_per_tok > spec.num_experts:
            raise ValueError(f"num_experts_per_tok ({spec.num_experts_per_tok}) must be in "
                             f"1..num_experts ({spec.num_experts})")

    def make_layer(self, spec: ModelSpec, layer_idx: int, rotary: RotaryEmbedding,
                   ctx: BuildContext) -> nn.Module:
        attn = RopeAttention(spec, layer_idx, rotary, ctx=ctx.child("self_attn"), qk_norm=spec.qk_norm)
        mlp: nn.Module
        if layer_idx in spec.dense_mlp_layers:
            mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, spec.hidden_act,
                           ctx=ctx.child("mlp"))
        else:
            mlp = SparseMoeBlock(spec, ctx=ctx.child("mlp"))
        return DecoderLayer(attn, mlp, spec.hidden_size, spec.norm_eps, ctx=ctx)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """The generic loader, with the per-expert tensors stacked (see module docstring). A
        stacked parameter counts as loaded once every expert's shards arrived."""
        params = dict(self.named_parameters())
        names = self.spec.checkpoint_names
        seen: dict[str, set[tuple[int, str]]] = {}

        def others() -> Iterator[tuple[str, Tensor]]:
            for ckpt_name, tensor in weights:
                match = _EXPERT.match(names.rename(ckpt_name))
                if match is None:
                    yield ckpt_name, tensor
                    continue
                part = match["part"]
                target = f"{match['prefix']}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
                param = params.get(target)
                if param is None:
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no model parameter "
                                     f"(looked for {target!r})")
                param.weight_loader(param, tensor, (int(match["expert"]), part))  # type: ignore[attr-defined]
                seen.setdefault(target, set()).add((int(match["expert"]), part))

        loaded = super().load_weights(others())
        for target, shards in seen.items():
            moe = cast(FusedMoE, self.get_submodule(target.rsplit(".", 1)[0]))
            parts = ("down",) if target.endswith("down_proj") else ("gate", "up")
            if shards == {(e, p) for e in range(moe.num_experts) for p in parts}:
                loaded.add(target)
        return loaded
