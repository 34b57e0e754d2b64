"""Triton fused GEMV (pagedserve.kernels.triton.gemv) vs its twin reference.fused_gemv_reference.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/kernels/conftest.py) at tiny shapes
with tiny tiles, so multi-tile K loops, ragged K and N tails and padded M rows are all exercised;
the `gpu` tests repeat the checks at Llama-3-8B shapes with the real launch table. Outputs start
as NaN so an element the kernel fails to write shows up.

The interpreter rounds float32 -> bfloat16 toward zero (the GPU rounds to nearest even), so under
the interpreter bf16 results may differ from the twin by an ulp at each rounding step; the GPU
tests hold the residual sum to exact equality.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels import reference as ref  # noqa: E402
from pagedserve.kernels.triton.gemv import (  # noqa: E402
    GemvConfig,
    fused_gemv,
    pick_config,
    prefer_fused_gemv,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

TINY = GemvConfig(block_n=4, block_k=32)  # K=100 -> 4 K steps, the last one ragged
# Relative to the largest |output|: float32 only reorders the sum; fp16/bf16 round the output
# (and, with the norm, its input) to 11 / 8 significant bits.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _randn(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g, device=DEVICE) * scale).to(dtype)


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int, gated: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rows = 2 * n if gated else n
    return {
        "x": _randn((m, k), dtype, g),
        "weight": _randn((rows, k), dtype, g, 1 / math.sqrt(k)),
        "bias": _randn((rows,), dtype, g),
        "norm_weight": _randn((k,), dtype, g) + 1,
        "residual": _randn((m, k), dtype, g),
    }


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not got.isnan().any(), "an output element was not written"
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= REL_TOL[want.dtype] * scale + 1e-6, f"max error {err} vs max |want| {scale}"


def _residual_close(got: torch.Tensor, want: torch.Tensor) -> None:
    if want.dtype == torch.bfloat16 and not CUDA:  # interpreter rounds toward zero: 1 ulp
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def check(m: int, n: int, k: int, dtype: torch.dtype, *, bias: bool = False, norm: bool = False,
          residual: bool = False, gated: bool = False, config: GemvConfig | None = TINY,
          seed: int = 0) -> None:
    t = _inputs(m, n, k, dtype, seed, gated)
    kwargs: dict = {"bias": t["bias"] if bias else None, "gated": gated}
    if norm:
        kwargs["norm_weight"] = t["norm_weight"]
        kwargs["residual"] = t["residual"] if residual else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    got = fused_gemv(t["x"], t["weight"], out=out, config=config, **kwargs)
    want = ref.fused_gemv_reference(t["x"], t["weight"], **kwargs)
    if not norm:
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        assert got is out
        _close(got, want)
        return
    assert isinstance(got, tuple) and isinstance(want, tuple)
    assert got[0] is out
    _close(got[0], want[0])
    if residual:
        _residual_close(got[1], want[1])
    else:
        assert got[1] is t["x"]


@pytest.mark.parametrize(
    ("m", "dtype", "bias"),
    [(1, torch.float32, False), (3, torch.float32, True), (8, torch.bfloat16, True), (1, torch.float16, False)],
)
def test_plain(m: int, dtype: torch.dtype, bias: bool) -> None:
    check(m, 22, 100, dtype, bias=bias)


def test_plain_even_tiles() -> None:
    check(2, 16, 96, torch.float32, config=GemvConfig(block_n=8, block_k=32))
    check(5, 16, 64, torch.bfloat16, bias=True, config=GemvConfig(block_n=4, block_k=64))


@pytest.mark.parametrize("k", [96, 100])
def test_prefetch(k: int) -> None:
    cfg = GemvConfig(block_n=4, block_k=32, prefetch=True)
    check(3, 22, k, torch.float32, bias=True, config=cfg)
    check(1, 10, k, torch.float32, norm=True, residual=True, gated=True, config=cfg)
    check(8, 12, k, torch.bfloat16, norm=True, residual=True, config=cfg)


@pytest.mark.parametrize(
    ("m", "dtype", "residual"),
    [(1, torch.float32, True), (3, torch.float32, False), (8, torch.bfloat16, True), (3, torch.float16, True)],
)
def test_norm_prologue(m: int, dtype: torch.dtype, residual: bool) -> None:
    check(m, 22, 100, dtype, norm=True, residual=residual, bias=m == 3)


@pytest.mark.parametrize(
    ("m", "dtype", "norm", "bias"),
    [(1, torch.float32, True, False), (3, torch.float32, False, True), (8, torch.bfloat16, True, True)],
)
def test_gated_epilogue(m: int, dtype: torch.dtype, norm: bool, bias: bool) -> None:
    check(m, 10, 100, dtype, norm=norm, residual=norm, bias=bias, gated=True)


def test_default_config_and_given_residual_out() -> None:
    t = _inputs(2, 12, 80, torch.float32, seed=1)
    res_out = torch.full_like(t["x"], float("nan"))
    out, s = fused_gemv(t["x"], t["weight"], norm_weight=t["norm_weight"], residual=t["residual"],
                        residual_out=res_out, eps=1e-5)
    want, want_s = ref.fused_gemv_reference(t["x"], t["weight"], norm_weight=t["norm_weight"],
                                            residual=t["residual"], eps=1e-5)
    assert s is res_out
    _close(out, want)
    _residual_close(s, want_s)


def test_validation_errors() -> None:
    t = _inputs(2, 8, 32, torch.float32, seed=2)
    x, w = t["x"], t["weight"]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"x": torch.zeros(9, 32)}, "1 <= M <= 8"),
        ({"x": torch.zeros(0, 32)}, "1 <= M <= 8"),
        ({"x": x.T.contiguous().T}, "contiguous K"),
        ({"x": x.to(torch.int32)}, "dtype"),
        ({"weight": torch.zeros(8, 31)}, "weight must be"),
        ({"weight": w.to(torch.float16)}, "weight must be"),
        ({"weight": w.T.contiguous().T}, "weight must be"),
        ({"weight": torch.zeros(7, 32), "gated": True}, "2\\*I rows"),
        ({"bias": torch.zeros(7)}, "bias must be"),
        ({"norm_weight": torch.zeros(31)}, "norm_weight must be"),
        ({"residual": t["residual"]}, "need norm_weight"),
        ({"norm_weight": t["norm_weight"], "residual_out": torch.empty_like(x)}, "only written"),
        ({"norm_weight": t["norm_weight"], "eps": 0.0}, "eps"),
        ({"norm_weight": t["norm_weight"], "residual": torch.zeros(3, 32)}, "residual must be"),
        ({"out": torch.empty(2, 9)}, "out must be"),
        ({"out": torch.empty(2, 8, dtype=torch.float16)}, "out must be"),
        ({"out": x[:, :8]}, "must not overlap"),
        ({"norm_weight": t["norm_weight"], "residual": t["residual"], "residual_out": t["residual"]},
         "must not overlap"),
    ]
    for override, match in bad:
        kwargs: dict[str, Any] = {"x": x, "weight": w, **override}
        with pytest.raises(ValueError, match=match):
            fused_gemv(**kwargs)


def test_launch_table_is_deterministic_and_fills_the_gpu() -> None:
    # Llama-3-8B: qkv (norm), o, gate_up (norm, gated, I = 14336), down, lm_head (+ final norm):
    # at least 2 programs per SM of a 132-SM H100/H200, all warps along K for bf16 (see the module
    # docstring), accumulator and weight vectors within ~96 registers per thread.
    for n, k, norm, gated in [(6144, 4096, True, False), (4096, 4096, False, False),
                              (14336, 4096, True, True), (4096, 14336, False, False),
                              (128256, 4096, False, False), (128256, 4096, True, False)]:
        for m in range(1, 9):
            cfg = pick_config(n, k, m, norm=norm, gated=gated)
            assert cfg == pick_config(n, k, m, norm=norm, gated=gated)
            assert math.ceil(n / cfg.block_n) >= 2 * 132, (n, k, m, cfg)
            assert cfg.block_k % (32 * cfg.num_warps * 8) == 0, cfg
            vectors = (2 if gated else 1) * cfg.block_n * cfg.block_k // (32 * cfg.num_warps * 8)
            assert vectors * (4 + (1 << (m - 1).bit_length())) <= 96, (n, k, m, cfg)


def test_prefer_fused_gemv() -> None:
    assert prefer_fused_gemv(1, norm=True, gated=True)
    assert not prefer_fused_gemv(2, norm=True, gated=True)
    assert prefer_fused_gemv(2, norm=True, gated=False) and not prefer_fused_gemv(3, norm=True, gated=False)
    assert prefer_fused_gemv(4, norm=False, gated=False) and not prefer_fused_gemv(5, norm=False, gated=False)


# ---------------------------------------------------------------------------------------------
# Real shapes on the GPU (skipped without CUDA), default launch table
# ---------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_llama3_8b_shapes(m: int, dtype: torch.dtype) -> None:
    check(m, 6144, 4096, dtype, norm=True, residual=True, config=None, seed=10)  # norm + qkv
    check(m, 4096, 4096, dtype, config=None, seed=11)  # o_proj
    check(m, 14336, 4096, dtype, norm=True, residual=True, gated=True, config=None, seed=12)
    check(m, 4096, 14336, dtype, config=None, seed=13)  # down
    check(m, 1000, 4096, dtype, bias=True, norm=True, config=None, seed=14)  # ragged N, no residual


@gpu
@needs_cuda
def test_gpu_ragged_k_and_bias() -> None:
    check(2, 4000, 4000, torch.bfloat16, bias=True, config=None, seed=15)
    check(5, 3000, 1000, torch.float16, bias=True, norm=True, residual=True, gated=True, config=None, seed=16)
