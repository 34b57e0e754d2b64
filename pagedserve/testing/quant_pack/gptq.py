"""TEST-ONLY GPTQ packer: round-to-nearest quantization written out in the published layout
(AutoGPTQ's `pack`; the GPTQ error-compensation algorithm itself is not needed by the tests).

A module's weight w [N, K] (N outputs, K inputs), pf = 32 // bits, groups of G input rows:

    qweight int32 [K / pf, N]  word r of column n: bits [bits*i, bits*(i+1)) = q[pf*r + i, n]
    qzeros  int32 [K / G, N / pf]  word c of group g: bits [bits*i, ..) = z[g, pf*c + i]
                               (z - 1 for checkpoint_format "gptq", z for "gptq_v2")
    scales  fp16  [K / G, N]
    g_idx   int32 [K]          group of input row k: k // G, or with desc_act the position of k in
                               a permutation (the order AutoGPTQ quantized the rows in) // G
    w[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]

Rows stay in the original order in qweight; only g_idx says which group each belongs to. With
desc_act the permutation is drawn per input (q/k/v share one, gate/up one), as GPTQ derives it
from the input activations. The quantization is AutoGPTQ's: per group and output column, the
range [min(w, 0), max(w, 0)] (symmetric: +-max|w|) over 2**bits - 1 steps; zero = 2**(bits-1)
if sym, else round(-min / scale) (at least 1 in the "gptq" format, which cannot store zero 0).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pagedserve.testing.quant_pack.common import QuantizedTensor, TensorQuantizer

__all__ = ["gptq_config", "gptq_quantizer", "pack_gptq_columns", "pack_gptq_rows"]

_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                 "up_proj": "gate_up"}


def _to_int32(words: Tensor) -> Tensor:
    """int64 words in [0, 2**32) -> the int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_gptq_rows(q: Tensor, bits: int) -> Tensor:
    """int [K, N] in [0, 2**bits) -> int32 [K / pf, N]: row pf*r + i into bits [bits*i, ..) of row r."""
    pf = 32 // bits
    q = q.to(torch.int64)
    words = torch.zeros(q.shape[0] // pf, q.shape[1], dtype=torch.int64)
    for i in range(pf):
        words |= q[i::pf] << (bits * i)
    return _to_int32(words)


def pack_gptq_columns(z: Tensor, bits: int) -> Tensor:
    """int [G, N] -> int32 [G, N / pf]: column pf*c + i into bits [bits*i, ..) of column c.
    Values are masked to `bits` bits first (zero - 1 = -1 is stored as 2**bits - 1)."""
    pf = 32 // bits
    z = z.to(torch.int64) & ((1 << bits) - 1)
    words = torch.zeros(z.shape[0], z.shape[1] // pf, dtype=torch.int64)
    for i in range(pf):
        words |= z[:, i::pf] << (bits * i)
    return _to_int32(words)


def _permutation(module: str, k: int, seed: int) -> Tensor:
    head, _, last = module.rpartition(".")
    key = f"{head}.{_SHARED_INPUT.get(last, last)}"  # one act-order per input activation
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()) ^ seed)
    return torch.randperm(k, generator=g)


def _rule(dynamic: Mapping[str, Mapping[str, Any]], module: str) -> dict[str, Any] | None:
    """GPTQModel's `dynamic`: the first rule whose regex matches; "-:" = not quantized."""
    for key, overrides in dynamic.items():
        if key.startswith("-:"):
            if re.match(key[2:], module):
                return None
        elif re.match(key.removeprefix("+:"), module):
            return dict(overrides)
    return {}


def gptq_quantizer(bits: int = 4, group_size: int = 128, *, sym: bool = True, desc_act: bool = False,
                   checkpoint_format: str = "gptq", dynamic: Mapping[str, Mapping[str, Any]] | None = None,
                   modules_in_block_to_quantize: Sequence[str] = (), seed: int = 0) -> TensorQuantizer:
    """The TensorQuantizer for quantize_checkpoint. Modules a "-:" dynamic rule excludes, or
    missing from a non-empty modules_in_block_to_quantize ("mlp.down_proj", ...), keep their
    float weight; "+:" rules override bits / group_size / sym / desc_act."""

    def quantize(module: str, w: Tensor) -> QuantizedTensor:
        rule = _rule(dynamic or {}, module)
        if modules_in_block_to_quantize and not any(module.endswith(f".{m}")
                                                    for m in modules_in_block_to_quantize):
            rule = None
        if rule is None:
            return QuantizedTensor({"weight": w}, w)
        return _quantize(module, w, rule.get("bits", bits), rule.get("group_size", group_size),
                         rule.get("sym", sym), rule.get("desc_act", desc_act))

    def _quantize(module: str, w: Tensor, nbits: int, group: int, symmetric: bool,
                  act_order: bool) -> QuantizedTensor:
        n, k = w.shape
        g = k if group == -1 else group
        if k % g or k % (32 // nbits) or n % (32 // nbits):
            raise ValueError(f"{module}: [{n}, {k}] does not fit {nbits}-bit groups of {g}")
        maxq = (1 << nbits) - 1
        order = _permutation(module, k, seed) if act_order else torch.arange(k)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // g).to(torch.int32)
        wt = w.t()  # [K, N]
        grouped = wt[order].reshape(k // g, g, n)  # rows in quantization order, by group
        xmin = grouped.amin(dim=1).clamp(max=0)
        xmax = grouped.amax(dim=1).clamp(min=0)
        if symmetric:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        dead = (xmin == 0) & (xmax == 0)
        xmin, xmax = torch.where(dead, -1.0, xmin), torch.where(dead, 1.0, xmax)
        scales = ((xmax - xmin) / maxq).half()  # [G, N], stored (and used) in fp16
        s = scales.float()
        if symmetric:
            zeros = torch.full_like(s, (maxq + 1) // 2)
        else:
            zeros = torch.round(-xmin / s).clamp(0, maxq)
            if checkpoint_format == "gptq":
                zeros = zeros.clamp(min=1)
        row_s, row_z = s[g_idx.long()], zeros[g_idx.long()]  # [K, N] per original row
        q = torch.clamp(torch.round(wt / row_s) + row_z, 0, maxq)
        dequantized = ((q - row_z) * row_s).t().contiguous()  # [N, K]
        stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
        tensors = {"qweight": pack_gptq_rows(q, nbits), "qzeros": pack_gptq_columns(stored_zeros, nbits),
                   "scales": scales, "g_idx": g_idx}
        return QuantizedTensor(tensors, dequantized)

    return quantize


def gptq_config(bits: int = 4, group_size: int = 128, *, sym: bool = True, desc_act: bool = False,
                checkpoint_format: str = "gptq", dynamic: Mapping[str, Any] | None = None,
                modules_in_block_to_quantize: Sequence[Sequence[str]] = (),
                autogptq_file: bool = False) -> dict[str, Any]:
    """The quantization config as published: config.json's `quantization_config` (Optimum /
    GPTQModel), or with autogptq_file the older AutoGPTQ quantize_config.json, which names no
    quant_method (the user passes quantization="gptq") and no checkpoint_format."""
    config: dict[str, Any] = {"bits": bits, "group_size": group_size, "damp_percent": 0.01,
                              "desc_act": desc_act, "sym": sym, "true_sequential": True,
                              "static_groups": False}
    if autogptq_file:
        config.update(model_name_or_path=None, model_file_base_name="model")
        return config
    config.update(quant_method="gptq", checkpoint_format=checkpoint_format, lm_head=False)
    if dynamic:
        config["dynamic"] = dict(dynamic)
    if modules_in_block_to_quantize:  # Optimum writes a list of lists (one per sequential step)
        config["modules_in_block_to_quantize"] = [list(step) for step in modules_in_block_to_quantize]
    return config
