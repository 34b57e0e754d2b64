"""Triton SqueezeLLM kernels (kernels/triton/lut_gemv.py) vs the twin reference_lut.

Without a GPU they run under TRITON_INTERPRET=1 (tests/kernels/conftest.py) at small sizes with
small tiles, so several K steps, a ragged N tail and padded M rows are exercised. The `gpu` test
repeats the check at a Llama-sized shape."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels import reference_lut as ref  # noqa: E402
from pagedserve.kernels.reference_lut import dequantize_lut  # noqa: E402
from pagedserve.kernels.reference_quant import pack_along_rows  # noqa: E402
from pagedserve.kernels.triton.lut_gemv import MAX_M, lut_dequantize, lut_gemv, lut_matmul  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# bf16 only on the GPU: the interpreter rounds to bf16 toward zero, a bias that the sums of these
# skewed random weights accumulate coherently (float16 rounds to nearest there, as on the GPU)
EXTRAS_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _weights(k: int, n: int, seed: int, table_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 16, (k, n), generator=g)
    lut = (torch.randn(n, 16, generator=g) / k**0.5).to(table_dtype)
    return pack_along_rows(idx, 4).to(DEVICE), lut.to(DEVICE)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= REL_TOL[want.dtype] * scale + 1e-6, f"max error {err} vs max |want| {scale}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_equals_twin(dtype: torch.dtype) -> None:
    qweight, lut = _weights(96, 40, seed=1)
    want = dequantize_lut(qweight, lut).to(dtype)
    got = lut_dequantize(qweight, lut, dtype, block_n=16, block_k=32)  # ragged N, 3 K tiles
    if dtype == torch.bfloat16 and not CUDA:  # the interpreter rounds to bf16 toward zero
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("m", [1, 3, MAX_M])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_gemv_equals_twin(m: int, dtype: torch.dtype, bias: bool) -> None:
    qweight, lut = _weights(256, 40, seed=m)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(m, 256, generator=g).to(DEVICE, dtype)
    b = torch.randn(40, generator=g).to(DEVICE, dtype) if bias else None
    got = lut_gemv(x, qweight, lut, b, block_n=16, block_k=64)  # 3 programs, 4 K steps
    _close(got, ref.lut_matmul(x, qweight, lut, b))


def test_dispatch_by_token_count() -> None:
    qweight, lut = _weights(64, 24, seed=3)
    g = torch.Generator().manual_seed(5)
    for m in (2, MAX_M + 1):  # fused, then dequantize + F.linear
        x = torch.randn(m, 64, generator=g).to(DEVICE)
        _close(lut_matmul(x, qweight, lut), ref.lut_matmul(x, qweight, lut))
    with pytest.raises(ValueError, match="lookup_table must be"):
        lut_gemv(torch.zeros(1, 64, device=DEVICE), qweight, lut[:, :8].contiguous())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 8, 64])
def test_llama_shape_on_gpu(m: int) -> None:
    qweight, lut = _weights(4096, 4096, seed=0)
    x = torch.randn(m, 4096, device=DEVICE, dtype=torch.bfloat16)
    _close(lut_matmul(x, qweight, lut), ref.lut_matmul(x, qweight, lut))


@pytest.mark.parametrize("extras", ["norm", "norm+residual", "gated", "norm+residual+gated"])
@pytest.mark.parametrize("dtype", EXTRAS_DTYPES)
def test_fused_extras_equal_twin(extras: str, dtype: torch.dtype) -> None:
    """The RMSNorm prologue (with the residual add) and the SiLU-and-mul epilogue."""
    gated = "gated" in extras
    n = 2 * 24 if gated else 24
    qweight, lut = _weights(128, n, seed=4)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 128, generator=g).to(DEVICE, dtype)
    kwargs: dict[str, Any] = {"norm_weight": (torch.randn(128, generator=g) * 0.1 + 1).to(DEVICE, dtype), "eps": 1e-5,
              "residual": torch.randn(2, 128, generator=g).to(DEVICE, dtype) if "residual" in extras else None,
              "gated": gated}
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    got, got_res = lut_gemv(x, qweight, lut, bias, block_n=16, block_k=32, **kwargs)
    want, want_res = ref.lut_matmul(x, qweight, lut, bias, **kwargs)
    assert got.shape == (2, n // 2 if gated else n)
    _close(got, want)
    if kwargs["residual"] is None:
        assert got_res is x
    else:
        assert torch.equal(got_res, want_res)
