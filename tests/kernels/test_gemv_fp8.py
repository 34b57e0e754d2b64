"""fused_gemv with float8_e4m3fn weights and a weight scale (per tensor or per weight row) vs its
twin reference.fused_gemv_reference(weight_scale=): the FP8 checkpoints' decode GEMV. Under
TRITON_INTERPRET=1 without a GPU (tests/kernels/conftest.py), at tiny shapes and tiles, so
multi-step and ragged K, N tails and padded M rows are exercised; outputs start as NaN."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels import reference as ref  # noqa: E402
from pagedserve.kernels.triton.gemv import GemvConfig, fused_gemv  # noqa: E402
from tests.kernels.test_gemv import DEVICE, REL_TOL, TINY, _close, _residual_close  # noqa: E402


def _fp8_inputs(m: int, rows: int, k: int, dtype: torch.dtype, per_row: bool, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    weight = torch.randn((rows, k), generator=g, device=DEVICE) / math.sqrt(k)
    amax = weight.abs().amax(dim=1) if per_row else weight.abs().amax().reshape(1)
    scale = (amax / 448.0).float().contiguous()  # e4m3's largest finite value
    q = (weight / scale.reshape(-1, 1)).to(torch.float8_e4m3fn)
    return {
        "x": torch.randn((m, k), generator=g, device=DEVICE).to(dtype),
        "weight": q,
        "weight_scale": scale if per_row else scale.reshape(()),
        "bias": torch.randn((rows,), generator=g, device=DEVICE).to(dtype),
        "norm_weight": (torch.randn((k,), generator=g, device=DEVICE) + 1).to(dtype),
        "residual": torch.randn((m, k), generator=g, device=DEVICE).to(dtype),
    }


@pytest.mark.parametrize(
    ("m", "dtype", "per_row", "norm", "gated", "bias"),
    [
        (1, torch.float32, False, False, False, False),
        (3, torch.float32, True, False, False, True),
        (8, torch.bfloat16, True, True, False, False),
        (1, torch.float32, False, True, True, True),
        (2, torch.bfloat16, False, False, True, True),
        (5, torch.float32, True, True, True, False),
    ],
)
def test_fp8_weights_match_the_twin(m: int, dtype: torch.dtype, per_row: bool, norm: bool, gated: bool,
                                    bias: bool) -> None:  # fmt: skip
    n = 10 if gated else 22
    t = _fp8_inputs(m, 2 * n if gated else n, 100, dtype, per_row, seed=m)
    kwargs: dict = {"bias": t["bias"] if bias else None, "gated": gated, "weight_scale": t["weight_scale"]}
    if norm:
        kwargs.update(norm_weight=t["norm_weight"], residual=t["residual"])
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    got = fused_gemv(t["x"], t["weight"], out=out, config=TINY, **kwargs)
    want = ref.fused_gemv_reference(t["x"], t["weight"], **kwargs)
    if norm:
        assert isinstance(got, tuple) and isinstance(want, tuple)
        _close(got[0], want[0])
        _residual_close(got[1], want[1])
    else:
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        _close(got, want)
    # the twin itself: the scaled e4m3 weight is what the dot products see
    dense = t["weight"].float() * t["weight_scale"].reshape(-1, 1)
    plain = ref.fused_gemv_reference(t["x"].float(), dense, bias=kwargs["bias"].float() if bias else None,
                                     norm_weight=t["norm_weight"].float() if norm else None,
                                     residual=t["residual"].float() if norm else None, gated=gated)  # fmt: skip
    plain_y = plain[0] if isinstance(plain, tuple) else plain
    want_y = want[0] if isinstance(want, tuple) else want
    err = (plain_y - want_y.float()).abs().max().item()
    assert err <= max(REL_TOL[dtype], 1e-4) * 4 * plain_y.abs().max().item() + 1e-5


def test_fp8_even_tiles_and_a_one_row_weight() -> None:
    t = _fp8_inputs(4, 16, 64, torch.float32, per_row=True, seed=9)
    got = fused_gemv(t["x"], t["weight"], weight_scale=t["weight_scale"], config=GemvConfig(block_n=8, block_k=32))
    want = ref.fused_gemv_reference(t["x"], t["weight"], weight_scale=t["weight_scale"])
    assert isinstance(want, torch.Tensor)
    _close(got, want)
    one = _fp8_inputs(2, 1, 64, torch.float32, per_row=True, seed=10)
    got = fused_gemv(one["x"], one["weight"], weight_scale=one["weight_scale"], config=TINY)
    want = ref.fused_gemv_reference(one["x"], one["weight"], weight_scale=one["weight_scale"])
    assert isinstance(want, torch.Tensor)
    _close(got, want)


def test_fp8_bad_arguments_are_refused() -> None:
    t = _fp8_inputs(2, 8, 64, torch.float32, per_row=True, seed=11)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fused_gemv(t["x"], t["weight"].float(), weight_scale=t["weight_scale"])
    with pytest.raises(ValueError, match="weight_scale must be"):
        fused_gemv(t["x"], t["weight"], weight_scale=t["weight_scale"][:3].clone())
    with pytest.raises(ValueError, match="weight_scale must be"):
        fused_gemv(t["x"], t["weight"], weight_scale=t["weight_scale"].double())
    with pytest.raises(ValueError, match="must be a"):  # fp8 without a scale: the model dtype is required
        fused_gemv(t["x"], t["weight"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("n", "k", "norm", "gated"), [(6144, 4096, True, False), (4096, 4096, False, False),
                                                        (14336, 4096, True, True), (4096, 14336, False, False)])
@pytest.mark.parametrize("m", [1, 8])
def test_fp8_at_llama_3_8b_shapes(n: int, k: int, norm: bool, gated: bool, m: int) -> None:
    """The launch table's configs on an e4m3 GPU, bf16 activations, per-row scales."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 needs compute capability >= 8.9")
    t = _fp8_inputs(m, 2 * n if gated else n, k, torch.bfloat16, per_row=True, seed=n + m)
    kwargs: dict = {"gated": gated, "weight_scale": t["weight_scale"]}
    if norm:
        kwargs.update(norm_weight=t["norm_weight"], residual=t["residual"])
    got = fused_gemv(t["x"], t["weight"], **kwargs)
    want = ref.fused_gemv_reference(t["x"], t["weight"], **kwargs)
    got_y = got[0] if isinstance(got, tuple) else got
    want_y = want[0] if isinstance(want, tuple) else want
    _close(got_y, want_y)
