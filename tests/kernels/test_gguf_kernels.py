"""Triton GGUF kernels (kernels/triton/gguf_matmul.py) vs the twin reference_gguf, for every
kept block type, on valid random blocks (pagedserve.testing.gguf_files.random_block_bytes).

Without a GPU they run under TRITON_INTERPRET=1 (tests/kernels/conftest.py) at small sizes: K is
one or two 256-value super-blocks, tiles are smaller than a block (and not aligned to it), N has
a ragged tail and M padded rows. The `gpu` test repeats the check at a Llama-sized shape."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("gguf")

from pagedserve.kernels import reference_gguf as ref  # noqa: E402
from pagedserve.kernels.reference_gguf import GGUF_BLOCKS, GGUFWeight, dequantize_gguf  # noqa: E402
from pagedserve.kernels.triton.gguf_matmul import MAX_M, gguf_dequantize, gguf_gemv, gguf_matmul  # noqa: E402
from pagedserve.testing.gguf_files import random_block_bytes  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TYPES = list(GGUF_BLOCKS)
# bf16 only on the GPU: the interpreter rounds to bf16 toward zero, a bias that the sums of these
# skewed random weights accumulate coherently (float16 rounds to nearest there, as on the GPU)
EXTRAS_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


_HALVES = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}  # float16 fields


def _weight(qtype: str, n: int, k: int, seed: int, scale: float | None = None) -> GGUFWeight:
    """Valid random blocks; `scale` replaces every float16 field (d, m, dmin) of every block."""
    raw = torch.from_numpy(random_block_bytes(qtype, n, k, seed))
    if scale is not None:
        blocks = raw.view(-1, GGUF_BLOCKS[qtype][2])
        for at in _HALVES[qtype]:
            blocks[:, at:at + 2] = torch.tensor([scale], dtype=torch.float16).view(torch.uint8)
    return GGUFWeight(raw.to(DEVICE), qtype, k)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(want).all()
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= REL_TOL[want.dtype] * scale + 1e-6, f"max error {err} vs max |want| {scale}"


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_equals_twin(qtype: str, dtype: torch.dtype) -> None:
    w = _weight(qtype, 20, 512, seed=1)
    want = dequantize_gguf(w).to(dtype)
    got = gguf_dequantize(w, dtype, block_n=8, block_k=32)  # tiles inside K-quant blocks, ragged N
    if CUDA:  # the compiler may contract d * q - m into one FMA: an ulp
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("m", [1, 5, 40])  # 40: two programs along M
def test_fused_gemv_equals_twin(qtype: str, m: int) -> None:
    w = _weight(qtype, 24, 256, seed=m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=g).to(DEVICE)
    bias = torch.randn(24, generator=g).to(DEVICE)
    got = gguf_gemv(x, w, bias, block_n=16, block_k=64)  # 2 programs (one ragged), 4 K steps
    _close(got, ref.gguf_matmul(x, w, bias))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_bf16_and_strided_rows(qtype: str) -> None:
    """bf16 activations; a weight that is a row slice of a wider buffer (row stride > row bytes)."""
    wide = _weight(qtype, 16, 512, seed=4)
    half = wide.data[:, : wide.data.shape[1] // 2]  # the first 256 values of each row
    w = GGUFWeight(half, qtype, 256)
    x = torch.randn(MAX_M, 256, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    _close(gguf_gemv(x, w, block_n=16, block_k=128), ref.gguf_matmul(x, w))


def test_dispatch_by_token_count() -> None:
    w = _weight("Q4_0", 8, 64, seed=3)
    g = torch.Generator().manual_seed(5)
    for m in (2, MAX_M + 1):  # fused, then dequantize + F.linear
        x = torch.randn(m, 64, generator=g).to(DEVICE)
        _close(gguf_matmul(x, w), ref.gguf_matmul(x, w))
    with pytest.raises(ValueError, match="no kernel"):
        gguf_matmul(torch.zeros(1, 256, device=DEVICE), _weight("Q5_K", 2, 256, seed=0))
    with pytest.raises(ValueError, match="must be uint8"):
        gguf_gemv(torch.zeros(1, 64, device=DEVICE), GGUFWeight(w.data[:, :10], "Q4_0", 64))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("m", [1, 16, 64])
def test_llama_shape_on_gpu(qtype: str, m: int) -> None:
    w = _weight(qtype, 4096, 4096, seed=0)
    x = torch.randn(m, 4096, device=DEVICE, dtype=torch.bfloat16) * 0.05
    _close(gguf_matmul(x, w), ref.gguf_matmul(x, w))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("extras", ["norm", "norm+residual", "gated", "norm+residual+gated"])
@pytest.mark.parametrize("dtype", EXTRAS_DTYPES)
def test_fused_extras_equal_twin(qtype: str, extras: str, dtype: torch.dtype) -> None:
    """The RMSNorm prologue (with the residual add) and the SiLU-and-mul epilogue."""
    gated = "gated" in extras
    w = _weight(qtype, 2 * 24 if gated else 24, 256, seed=2, scale=2e-3)  # float16: gate * up < 65504
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 256, generator=g).to(DEVICE, dtype)
    kwargs: dict[str, Any] = {"norm_weight": (torch.randn(256, generator=g) * 0.1 + 1).to(DEVICE, dtype), "eps": 1e-5,
              "residual": torch.randn(3, 256, generator=g).to(DEVICE, dtype) if "residual" in extras else None,
              "gated": gated}
    bias = torch.randn(w.out_features, generator=g).to(DEVICE, dtype)
    got, got_res = gguf_gemv(x, w, bias, block_n=16, block_k=64, **kwargs)
    want, want_res = ref.gguf_matmul(x, w, bias, **kwargs)
    assert got.shape == (3, w.out_features // 2 if gated else w.out_features)
    _close(got, want)
    if kwargs["residual"] is None:
        assert got_res is x
    else:
        assert torch.equal(got_res, want_res)


def test_norm_residual_over_two_row_tiles() -> None:
    """40 rows: two programs along M, each writing its rows of the residual sum."""
    w = _weight("Q8_0", 24, 64, seed=6, scale=2e-3)
    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(40, 64, generator=g).to(DEVICE) for _ in range(2))
    nw = (torch.randn(64, generator=g) * 0.1 + 1).to(DEVICE)
    got, got_res = gguf_gemv(x, w, norm_weight=nw, residual=res, block_n=16, block_k=32)
    want, want_res = ref.gguf_matmul(x, w, norm_weight=nw, residual=res)
    _close(got, want)
    assert torch.equal(got_res, want_res)
