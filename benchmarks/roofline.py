"""The roofline of a throughput run: the least time the work could take on the device, from the
model's shape (ModelSpec), the requests' lengths and two rates measured in the same run (a bf16
matmul, a device-to-device copy). A run's `roofline_fraction` is roofline_s / elapsed_s.

    compute_s = FLOPs / matmul rate, FLOPs =
        2 * body_params * computed tokens          every fed token through every linear layer
      + 2 * lm_head_params * output tokens         one LM-head row per sampled token
      + 4 * num_heads * head_dim * sum(context)    QK^T and PV, per layer, per fed token
    memory_s  = bytes / copy bandwidth, bytes =
        weight_bytes * min_steps                   every step reads the weights once
      + kv_bytes_per_token * computed tokens       each fed token's K and V written once
      + kv_bytes_per_token * sum(decode context)   each decode token reads its context's K and V
    min_steps = max(longest output, ceil(outputs / max_num_seqs), ceil(computed / max_num_batched_tokens))
    roofline_s = max(compute_s, memory_s)

Request i with prompt P, output O and c prompt tokens found in the prefix cache is fed positions
c .. P+O-2 (the last sampled token is never fed back); position p attends to p+1 keys (or the
layer's sliding window). Both bounds are lower bounds: prefill's reads of the KV cache, the sampler
and activations are left out, and an MoE step is charged all of its weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pagedserve.model_executor.model_spec import ModelSpec


def matmul_params(spec: ModelSpec) -> tuple[int, int]:
    """(weights one token multiplies through in the layers, weights of the LM head). An MoE layer
    counts its router, its shared experts and num_experts_per_tok routed experts."""
    h, hd = spec.hidden_size, spec.head_dim
    attn = h * spec.num_heads * hd * 2 + h * spec.num_kv_heads * hd * 2  # q, o; k, v
    dense_mlp = 3 * h * spec.intermediate_size  # gate, up, down
    body = 0
    for layer in range(spec.num_layers):
        if spec.num_experts and layer not in spec.dense_mlp_layers:
            expert = 3 * h * (spec.moe_intermediate_size or spec.intermediate_size)
            mlp = h * spec.num_experts + (spec.num_experts_per_tok + spec.num_shared_experts) * expert
            mlp += 3 * h * spec.shared_expert_intermediate_size
        else:
            mlp = dense_mlp
        body += attn + mlp
    return body, h * spec.vocab_size


def _context_sum(end: int, window: int | None) -> int:
    """sum over k = 1..end of min(k, window): the keys attended by positions 0..end-1."""
    if window is None or end <= window:
        return end * (end + 1) // 2
    return window * (window + 1) // 2 + (end - window) * window


def _layer_context(start: int, end: int, windows: Sequence[int | None]) -> int:
    """Keys attended by positions start..end-1, summed over the layers."""
    return sum(_context_sum(end, w) - _context_sum(start, w) for w in windows)


@dataclass(slots=True)
class Roofline:
    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    min_steps: int

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def row(self, elapsed_s: float) -> dict[str, Any]:
        return {"roofline_s": self.seconds, "bound": self.bound, "roofline_fraction": self.seconds / elapsed_s,
                "tflops": self.flops / 1e12, "gbytes": self.bytes / 1e9}


def roofline(
    spec: ModelSpec,
    prompt_lens: Sequence[int],
    output_lens: Sequence[int],
    cached_lens: Sequence[int],
    weight_bytes: int,
    kv_dtype_bytes: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    matmul_flops_per_s: float,
    copy_bytes_per_s: float,
) -> Roofline:
    body, lm_head = matmul_params(spec)
    windows = spec.sliding_windows or (None,) * spec.num_layers
    attn_per_key = 4 * spec.num_heads * spec.head_dim  # FLOPs per (query, key) pair per layer
    kv_bytes_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * kv_dtype_bytes
    computed = keys = decode_keys = 0
    for p, o, c in zip(prompt_lens, output_lens, cached_lens):
        c = min(c, p - 1)  # the last prompt token is always computed: it samples the first output
        end = p + o - 1  # positions fed: c .. end-1
        computed += end - c
        keys += _layer_context(c, end, windows)
        decode_keys += _layer_context(p, end, windows)
    outputs = sum(output_lens)
    flops = 2.0 * body * computed + 2.0 * lm_head * outputs + float(attn_per_key) * keys
    min_steps = max(max(output_lens, default=0), math.ceil(outputs / max_num_seqs),
                    math.ceil(computed / max_num_batched_tokens))
    kv_per_layer_key = kv_bytes_per_token // spec.num_layers
    nbytes = float(weight_bytes) * min_steps + kv_bytes_per_token * computed + kv_per_layer_key * decode_keys
    return Roofline(flops, nbytes, flops / matmul_flops_per_s, nbytes / copy_bytes_per_s, min_steps)
