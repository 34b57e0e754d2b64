"""Plain-torch twins for weight-only integer quantization (GPTQ, AWQ: "W4A16" / "W8A16").

Every integer format is converted at load time (its `process_weights_after_loading`) into one
canonical layout, `WNA16Weight`, which is what the kernels take:

    qweight  int32 [K / pf, N]   pf = 32 // bits values per int32, packed along K (GPTQ order):
                                 qweight[r, n] bits [bits*i, bits*(i+1)) = q[pf*r + i, n]
    scales   [G, N]              model dtype; G = K // group_size groups along K
    zeros    [G, N]              same dtype as scales; the real zero point (not zero-minus-one)
    perm     int64 [K] | None    act-order (GPTQ desc_act): qweight/scales/zeros are stored in
                                 the permuted input order, so y = x[:, perm] @ W
    w[k, n] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n]   (k permuted)

A kernel set may repack this once more into its own layout (`wna16_prepare`, once per layer after
loading) and multiply with that (`wna16_matmul`); the torch twins below leave it as it is.
Packing helpers work on unsigned values q in [0, 2**bits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pagedserve.kernels.reference import fused_add_rms_norm, rms_norm

__all__ = [
    "WNA16Weight",
    "dequantize_wna16",
    "pack_along_rows",
    "unpack_along_rows",
    "wna16_matmul",
    "wna16_prepare",
]

SUPPORTED_BITS = (4, 8)


class WNA16Weight(NamedTuple):
    qweight: Tensor  # int32 [K / (32 // bits), N]
    scales: Tensor  # [G, N]
    zeros: Tensor  # [G, N], dtype of scales
    perm: Tensor | None  # int64 [K] or None
    bits: int
    group_size: int  # K when the checkpoint says -1 (one group)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * (32 // self.bits)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 32 // bits


def pack_along_rows(q: Tensor, bits: int) -> Tensor:
    """q [K, N] ints in [0, 2**bits) -> int32 [K / pf, N], value i of a word in bits
    [bits*i, bits*(i+1)) (the sign bit holds the top value's high bit)."""
    pf = _check_bits(bits)
    k, n = q.shape
    if k % pf:
        raise ValueError(f"rows ({k}) must be a multiple of {pf} to pack {bits}-bit values")
    q64 = q.to(torch.int64).reshape(k // pf, pf, n)
    if q64.numel() and (q64.min() < 0 or q64.max() >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits})")
    shifts = (torch.arange(pf, dtype=torch.int64, device=q.device) * bits).view(1, pf, 1)
    words = (q64 << shifts).sum(dim=1)  # [K/pf, N] in [0, 2**32)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_along_rows(packed: Tensor, bits: int) -> Tensor:
    """int32 [K / pf, N] -> int32 [K, N] values in [0, 2**bits): the inverse of pack_along_rows."""
    pf = _check_bits(bits)
    rows, n = packed.shape
    shifts = (torch.arange(pf, dtype=torch.int32, device=packed.device) * bits).view(1, pf, 1)
    values = (packed.view(rows, 1, n) >> shifts) & ((1 << bits) - 1)  # arithmetic shift, masked
    return values.reshape(rows * pf, n)


def dequantize_wna16(w: WNA16Weight) -> Tensor:
    """The weight as [K, N] in the scales' dtype (rows in the stored, possibly permuted, order)."""
    q = unpack_along_rows(w.qweight, w.bits)
    k = q.shape[0]
    if k % w.group_size:
        raise ValueError(f"K ({k}) must be a multiple of group_size ({w.group_size})")
    group = torch.arange(k, device=q.device) // w.group_size
    scales = w.scales.float()[group]
    zeros = w.zeros.float()[group]
    return ((q.float() - zeros) * scales).to(w.scales.dtype)


def wna16_prepare(w: WNA16Weight) -> WNA16Weight:
    """The torch path multiplies the canonical layout directly."""
    return w


def wna16_matmul(x: Tensor, w: WNA16Weight, bias: Tensor | None = None, *,
                 norm_weight: Tensor | None = None, residual: Tensor | None = None,
                 eps: float = 1e-6, gated: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """x [T, K] -> y [T, N] (+ bias), in float32 math and x's dtype, like fused_gemv_reference:

        norm_weight given: x = rms_norm(x [+ residual]) * norm_weight first, and the result is
                           (y, x [+ residual]) (the new residual);
        gated:             y = silu(y[:, :N/2]) * y[:, N/2:]  (a [gate | up] projection)
    """
    new_residual = None
    if norm_weight is not None:  # the same rounding as fused_gemv_reference
        if residual is not None:
            x, new_residual = fused_add_rms_norm(x, residual, norm_weight, eps)
        else:
            x, new_residual = rms_norm(x, norm_weight, eps), x
    if w.perm is not None:
        x = x[:, w.perm]
    y = x.float() @ dequantize_wna16(w).float()
    if bias is not None:
        y = y + bias.float()
    if gated:
        half = y.shape[-1] // 2
        y = F.silu(y[:, :half]) * y[:, half:]
    out = y.to(x.dtype)
    return (out, new_residual) if new_residual is not None else out
