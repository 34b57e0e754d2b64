"""Plain-torch twins for GGUF (llama.cpp) weights kept as their raw blocks.

A quantized linear weight of N output features and K inputs is `data` uint8 [N, K / B * S]: one
row per output feature, each row K / B blocks of S bytes (B values each). Per type (offsets in
bytes inside one block; d, m, dmin float16; every block start is even, so float16 reads align):

    Q4_0  B=32  S=18   d | qs[16]                 v[j] = d * (nib(j) - 8)
    Q4_1  B=32  S=20   d | m | qs[16]             v[j] = d * nib(j) + m
    Q8_0  B=32  S=34   d | qs[32] (int8)          v[j] = qs[j] * d
          nib(j) = qs[j % 16] >> (4 * (j // 16)) & 15   (low nibbles: values 0..15, high: 16..31)
    Q4_K  B=256 S=144  d | dmin | scales[12] | qs[128]      8 sub-blocks s of 32 values
          v[32s + l] = (d * sc[s]) * q - (dmin * mn[s]),  q = qs[32 (s // 2) + l] >> (4 (s % 2)) & 15
          sc, mn: 6 bits each, packed in scales[12] (see _q4k_scale_min)
    Q6_K  B=256 S=210  ql[128] | qh[64] | scales[16] (int8) | d      16 groups of 16 values
          j = 128 h + r:  lo = ql[64 h + r % 64] >> (4 (r // 64)) & 15
                          hi = qh[32 h + r % 32] >> (2 (r // 32)) & 3
          v[j] = (d * scales[j // 16]) * ((lo | hi << 4) - 32)

Every value is computed in float32 with the operations in the order of the gguf package's
`gguf.quants` (the oracle; tests compare bit for bit), then rounded once to the model dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pagedserve.kernels.reference import fused_add_rms_norm, rms_norm

__all__ = ["GGUF_BLOCKS", "GGUFWeight", "dequantize_gguf", "gguf_matmul", "linear_with_extras", "row_bytes"]

# type name -> (ggml type id, values per block, bytes per block): the types kept quantized.
GGUF_BLOCKS: dict[str, tuple[int, int, int]] = {
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q6_K": (14, 256, 210),
}


class GGUFWeight(NamedTuple):
    data: Tensor  # uint8 [N, K / B * S], rows may be a strided view (row stride in bytes)
    qtype: str  # a key of GGUF_BLOCKS
    in_features: int  # K

    @property
    def out_features(self) -> int:
        return self.data.shape[0]


def row_bytes(qtype: str, k: int) -> int:
    """Bytes of one row of K values of `qtype`; ValueError unless K is a whole number of blocks."""
    _, block, size = GGUF_BLOCKS[qtype]
    if k % block:
        raise ValueError(f"{qtype} needs the input size ({k}) to be a multiple of {block}")
    return k // block * size


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The float16 at byte `start` of every block [R, S] -> float32 [R, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """uint8 [R, n] -> [R, 2n]: all low nibbles, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _q4k_scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    """scales uint8 [R, 12] -> (sc, mn) [R, 8] of 6-bit values:

        byte 0..3   = hi2(sc[4+j]) lo6(sc[j])     j = 0..3
        byte 4..7   = hi2(mn[4+j]) lo6(mn[j])
        byte 8..11  = lo4(mn[4+j]) lo4(sc[4+j])   (high nibble | low nibble)
    """
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=1)
    return sc, mn


def _dequantize_blocks(qtype: str, blocks: Tensor) -> Tensor:
    """uint8 [R, S] blocks of `qtype` -> float32 [R, B]."""
    if qtype == "Q4_0":
        q = _nibbles(blocks[:, 2:18]).to(torch.int8) - 8
        return _f16(blocks, 0) * q.float()
    if qtype == "Q4_1":
        return _f16(blocks, 0) * _nibbles(blocks[:, 4:20]).float() + _f16(blocks, 2)
    if qtype == "Q8_0":
        return blocks[:, 2:34].contiguous().view(torch.int8).float() * _f16(blocks, 0)
    if qtype == "Q4_K":
        r = blocks.shape[0]
        sc, mn = _q4k_scale_min(blocks[:, 4:16])
        d = (_f16(blocks, 0) * sc.float()).view(r, 8, 1)
        dm = (_f16(blocks, 2) * mn.float()).view(r, 8, 1)
        qs = blocks[:, 16:144].reshape(r, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8,
                                                                    device=blocks.device).view(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(r, 8, 32).float()  # sub-block 2i: low nibbles of 32i.., 2i+1: high
        return (d * q - dm).reshape(r, 256)
    if qtype == "Q6_K":
        r = blocks.shape[0]
        dev = blocks.device
        ql = blocks[:, 0:128].reshape(r, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8,
                                                                   device=dev).view(1, 1, 2, 1)
        ql = (ql & 0x0F).reshape(r, 8, 32)
        qh = blocks[:, 128:192].reshape(r, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                                     device=dev).view(1, 1, 4, 1)
        qh = (qh & 0x03).reshape(r, 8, 32)
        q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(r, 16, 16).float()
        scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
        d = (_f16(blocks, 208) * scales).view(r, 16, 1)
        return (d * q).reshape(r, 256)
    raise ValueError(f"GGUF type {qtype!r} is not kept quantized; kept: {', '.join(GGUF_BLOCKS)}")


def dequantize_gguf(w: GGUFWeight) -> Tensor:
    """The weight as float32 [N, K], value for value what gguf.quants.dequantize gives."""
    _, block, size = GGUF_BLOCKS[w.qtype]
    n, k = w.out_features, w.in_features
    if w.data.shape[1] != row_bytes(w.qtype, k):
        raise ValueError(f"{w.qtype} rows of {k} values take {row_bytes(w.qtype, k)} bytes, "
                         f"got {w.data.shape[1]}")
    blocks = w.data.contiguous().reshape(n * (k // block), size)
    return _dequantize_blocks(w.qtype, blocks).reshape(n, k)


def linear_with_extras(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                       norm_weight: Tensor | None = None, residual: Tensor | None = None,
                       eps: float = 1e-6, gated: bool = False) -> Any:
    """F.linear(x, weight.to(x.dtype), bias) with the decode extras of the fused kernels:

        norm_weight given: x = rms_norm(x [+ residual]) * norm_weight first (reference.py's
                           roundings) and the result is (y, x [+ residual]);
        gated:             weight = [gate | up] rows, y = silu(gate) * up, both kept in float32
                           and rounded once (as reference.fused_gemv_reference)."""
    new_residual = None
    if norm_weight is not None:
        if residual is not None:
            x, new_residual = fused_add_rms_norm(x, residual, norm_weight, eps)
        else:
            x, new_residual = rms_norm(x, norm_weight, eps), x
    if gated:
        y = F.linear(x.float(), weight.to(x.dtype).float(), None if bias is None else bias.float())
        half = y.shape[-1] // 2
        out = (F.silu(y[:, :half]) * y[:, half:]).to(x.dtype)
    else:
        out = F.linear(x, weight.to(x.dtype), bias)
    return out if new_residual is None else (out, new_residual)


def gguf_matmul(x: Tensor, w: GGUFWeight, bias: Tensor | None = None, *,
                norm_weight: Tensor | None = None, residual: Tensor | None = None,
                eps: float = 1e-6, gated: bool = False) -> Any:
    """x [T, K] -> y [T, N] (+ bias): F.linear with the weight dequantized and rounded to x's
    dtype, exactly what a layer holding the weight dequantized at load computes (and the
    extras of linear_with_extras)."""
    return linear_with_extras(x, dequantize_gguf(w), bias, norm_weight=norm_weight, residual=residual,
                              eps=eps, gated=gated)
