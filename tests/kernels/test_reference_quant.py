"""The canonical weight-only integer layout (kernels/reference_quant.py): packing round-trips and
the matmul twin equals x @ W of the dequantized weight, with act-order, norm and gating."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import reference
from pagedserve.kernels.reference_quant import (
    WNA16Weight,
    dequantize_wna16,
    pack_along_rows,
    unpack_along_rows,
    wna16_matmul,
)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trip_covers_every_value(bits: int) -> None:
    q = torch.arange(64 * 3).reshape(64, 3) % (1 << bits)
    q[-1, -1] = (1 << bits) - 1  # top bit of the last word set: a negative int32
    packed = pack_along_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 // (32 // bits), 3)
    assert torch.equal(unpack_along_rows(packed, bits), q.to(torch.int32))
    assert int(pack_along_rows(torch.tensor([[1]] + [[0]] * (32 // bits - 1)), bits)[0, 0]) == 1


def test_pack_rejects_out_of_range_and_ragged() -> None:
    with pytest.raises(ValueError, match="values must lie"):
        pack_along_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_along_rows(torch.zeros(6, 1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="bits must be"):
        pack_along_rows(torch.zeros(8, 1, dtype=torch.int64), 3)


def _weight(bits: int, k: int, n: int, group: int, act_order: bool) -> tuple[WNA16Weight, torch.Tensor]:
    g = torch.Generator().manual_seed(bits * 100 + group)
    q = torch.randint(0, 1 << bits, (k, n), generator=g)
    scales = torch.rand(k // group, n, generator=g) * 0.02 + 0.001
    zeros = torch.randint(0, 1 << bits, (k // group, n), generator=g).float()
    perm = torch.randperm(k, generator=g) if act_order else None
    w = WNA16Weight(pack_along_rows(q, bits), scales, zeros, perm, bits, group)
    expect = (q.float() - zeros.repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)
    return w, expect


@pytest.mark.parametrize(("bits", "group", "act_order"), [(4, 16, False), (4, 64, True), (8, 32, False), (8, 64, True)])
def test_matmul_equals_dequantized_product(bits: int, group: int, act_order: bool) -> None:
    w, expect = _weight(bits, 64, 24, group, act_order)
    assert torch.allclose(dequantize_wna16(w), expect)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(24)
    xp = x if w.perm is None else x[:, w.perm]
    assert torch.allclose(wna16_matmul(x, w, bias), xp @ expect + bias, atol=1e-5)


def test_norm_and_gated_fusion_match_the_unfused_ops() -> None:
    w, expect = _weight(4, 64, 32, 32, False)
    x, res, norm_w = torch.randn(3, 64), torch.randn(3, 64), torch.rand(64) + 0.5
    y, new_res = wna16_matmul(x, w, norm_weight=norm_w, residual=res, eps=1e-5, gated=True)
    h, s = reference.fused_add_rms_norm(x, res, norm_w, 1e-5)
    full = h @ expect
    assert torch.equal(new_res, s)
    assert torch.allclose(y, F.silu(full[:, :16]) * full[:, 16:], atol=1e-5)
