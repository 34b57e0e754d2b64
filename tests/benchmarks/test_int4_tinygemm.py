"""benchmarks/int4_tinygemm.py: a WNA16 weight converted for PyTorch's int4 matmul (the benchmark's
peer kernel) multiplies like the twin. On the CPU the op is `_weight_int4pack_mm_for_cpu`, which
shares the GPU op's dequantization (q - 8) * scale + zero, so the conversion of GPTQ / AWQ zeros
(zero' = (8 - z) * s), the whole-K group and act-order are checked here; the GPU packing is timed
and checked against the twin by benchmarks/wna16_bench.py."""

from __future__ import annotations

import pytest
import torch

from benchmarks.int4_tinygemm import supports, tinygemm_matmul, tinygemm_prepare
from pagedserve.kernels import reference_quant as rq

if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):  # pragma: no cover
    pytest.skip("this torch has no CPU int4 matmul", allow_module_level=True)


@pytest.mark.parametrize(("k", "n", "group", "perm"), [(256, 64, 128, False), (256, 64, -1, False),
                                                       (512, 96, 32, True), (256, 64, 64, False)])
def test_matches_twin(k: int, n: int, group: int, perm: bool) -> None:
    g = torch.Generator().manual_seed(k + n + group)
    size = k if group == -1 else group
    q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(k // size, n, generator=g) * 0.01 + 0.001).bfloat16()
    zeros = torch.randint(0, 16, (k // size, n), generator=g).bfloat16()
    order = torch.randperm(k, generator=g) if perm else None
    w = rq.WNA16Weight(rq.pack_along_rows(q, 4), scales, zeros, order, 4, size)
    assert supports(w)
    x = torch.randn(5, k, generator=g).bfloat16()
    got = tinygemm_matmul(x, tinygemm_prepare(w))
    want = rq.wna16_matmul(x, w)
    assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()


def test_refusals() -> None:
    w = rq.WNA16Weight(rq.pack_along_rows(torch.zeros(256, 64, dtype=torch.int32), 4),
                       torch.ones(2, 64).bfloat16(), torch.zeros(2, 64).bfloat16(), None, 4, 128)
    assert not supports(w._replace(scales=w.scales.float()))  # bf16 models only
    assert not supports(w._replace(group_size=16))
    with pytest.raises(ValueError, match="tinygemm cannot take"):
        tinygemm_prepare(w._replace(bits=8))
    with pytest.raises(ValueError, match="bf16"):
        tinygemm_matmul(torch.randn(1, 256), tinygemm_prepare(w))
