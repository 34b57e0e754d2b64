"""Triton weight-only int4/int8 kernels (kernels/triton/wna16*.py) vs the twin
reference_quant.wna16_matmul on the canonical layout.

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/kernels/conftest.py) at tiny shapes
with tiny tiles, so multi-step K loops, ragged K steps and N tails, split-K, padded M rows, every
group size (32 / 64 / 128 / one group), act-order and both bit widths are exercised; the `gpu`
tests repeat the checks at Llama-3-8B shapes with the real launch tables. Data are random and
non-zero (scales, zero points, inputs); outputs are compared relative to the largest |output|.

Tolerances: float32 only reorders sums (and the GEMV factors the scale out of each chunk). With
bfloat16 the twin rounds every dequantized weight to bf16 while the GEMV does not, and the
interpreter rounds float32 -> bf16 toward zero (the GPU to nearest), so bf16 results may differ
from the twin by a few bf16 ulps of the output; the new residual by one ulp.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels import reference_quant as rq  # noqa: E402
from pagedserve.kernels.triton.wna16 import (  # noqa: E402
    GEMV_DISPATCH_M,
    GEMV_MAX_M,
    MIN_GEMV_PROGRAMS,
    WNA16GemmConfig,
    WNA16GemvConfig,
    gemv_dispatch_m,
    pick_gemm_config,
    pick_gemv_config,
    wna16_fused_max_tokens,
    wna16_matmul,
    wna16_prepare,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
REL_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
F32, BF16 = torch.float32, torch.bfloat16


def make_weight(bits: int, k: int, n: int, group: int, act_order: bool, dtype: torch.dtype,
                g: torch.Generator) -> rq.WNA16Weight:
    """Random non-zero quantized weight: q uniform, real (non-integer) zero points near the middle,
    scales ~ 1 / (2**bits sqrt(K)) so that outputs stay O(1)."""
    q = torch.randint(0, 1 << bits, (k, n), generator=g, device=DEVICE)
    scales = (torch.rand(k // group, n, generator=g, device=DEVICE) + 0.5) * (4 / ((1 << bits) * math.sqrt(k)))
    zeros = (1 << (bits - 1)) + torch.randn(k // group, n, generator=g, device=DEVICE) * 2
    perm = torch.randperm(k, generator=g, device=DEVICE) if act_order else None
    return rq.WNA16Weight(rq.pack_along_rows(q.cpu(), bits).to(DEVICE), scales.to(dtype), zeros.to(dtype),
                          perm, bits, group)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not got.isnan().any(), "NaN in the output"
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= REL_TOL[want.dtype] * scale + 1e-6, f"max error {err} vs max |want| {scale}"


def check(bits: int, k: int, n: int, group: int, m: int, dtype: torch.dtype, *, perm: bool = False,
          bias: bool = False, norm: bool = False, residual: bool = False, gated: bool = False,
          gemv: WNA16GemvConfig | None = None, gemm: WNA16GemmConfig | None = None, seed: int = 0) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = make_weight(bits, k, n, group, perm, dtype, g)
    x = torch.randn(m, k, generator=g, device=DEVICE).to(dtype)
    kwargs: dict = {"gated": gated}
    b = torch.randn(n, generator=g, device=DEVICE).to(dtype) if bias else None
    if norm:
        kwargs["norm_weight"] = (torch.rand(k, generator=g, device=DEVICE) + 0.5).to(dtype)
        kwargs["residual"] = torch.randn(m, k, generator=g, device=DEVICE).to(dtype) if residual else None
        kwargs["eps"] = 1e-5
    prepared = wna16_prepare(w)
    got = wna16_matmul(x, prepared, b, gemv_config=gemv, gemm_config=gemm, **kwargs)
    want = rq.wna16_matmul(x, w, b, **kwargs)
    if not norm:
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        _close(got, want)
        return
    assert isinstance(got, tuple) and isinstance(want, tuple)
    _close(got[0], want[0])
    if residual:
        if dtype == BF16 and not CUDA:  # the interpreter rounds the sum toward zero
            torch.testing.assert_close(got[1], want[1], rtol=2**-7, atol=0)
        else:
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    else:
        assert got[1] is x  # the twin's new residual is x itself


# GEMV: BLOCK_K = 64 (2 or 4 chunks per step), K = 160 -> a ragged last step; N = 40 -> a ragged
# row block; split-K over 2 or 3 ranges.
GEMV_CASES = [
    # bits, group, m, dtype, perm, bias, norm, residual, gated, config
    (4, 32, 1, F32, False, True, False, False, False, WNA16GemvConfig(16, block_k=64)),
    (4, 32, 3, F32, True, False, True, True, True, WNA16GemvConfig(8, block_k=64, split_k=2)),
    (4, 32, 16, BF16, False, True, True, False, False, WNA16GemvConfig(16, block_k=64)),
    (4, 160, 1, BF16, True, True, True, True, True, WNA16GemvConfig(8, block_k=64)),
    (8, 32, 3, F32, True, True, False, False, False, WNA16GemvConfig(16, block_k=64, split_k=3)),
    (8, 32, 1, BF16, False, False, True, True, True, WNA16GemvConfig(8, block_k=64, split_k=2)),
    (8, 160, 16, F32, False, False, False, False, True, WNA16GemvConfig(8, block_k=64)),
    (8, 160, 3, F32, False, True, True, True, False, WNA16GemvConfig(16, block_k=64, split_k=2)),
]


@pytest.mark.parametrize(("bits", "group", "m", "dtype", "perm", "bias", "norm", "residual", "gated", "cfg"),
                         GEMV_CASES)
def test_gemv_matches_twin(bits: int, group: int, m: int, dtype: torch.dtype, perm: bool, bias: bool,
                           norm: bool, residual: bool, gated: bool, cfg: WNA16GemvConfig) -> None:
    n = 80 if gated else 40
    check(bits, 160, n, group, m, dtype, perm=perm, bias=bias, norm=norm, residual=residual,
          gated=gated, gemv=cfg)


@pytest.mark.parametrize(("bits", "group", "m"), [(4, 64, 2), (4, 128, 5), (8, 64, 2), (8, 128, 1)])
def test_gemv_groups_64_and_128(bits: int, group: int, m: int) -> None:
    # K = 256: chunks of 32 (int4) / 16 (int8) values, several per group
    check(bits, 256, 24, group, m, F32, bias=True, norm=True, residual=True,
          gemv=WNA16GemvConfig(8, block_k=128), seed=group + m)


def test_gemv_group_16() -> None:
    # group 16 with int4: two words per group
    check(4, 64, 24, 16, 2, F32, perm=True, bias=True, gemv=WNA16GemvConfig(8, block_k=32), seed=3)


# GEMM: T = 40 > one 16- or 32-row block, N tails, BLOCK_K capped by the group; int4 + bf16
# takes the factored path (tl.dot on 128 + q) unless the config says otherwise.
GEMM_CASES = [
    # bits, group, dtype, perm, bias, norm, residual, gated, config
    (4, 32, F32, True, True, True, True, True, WNA16GemmConfig(16, 32, 64)),
    (4, 128, BF16, False, True, False, False, False, WNA16GemmConfig(32, 16, 64)),  # factored
    (4, 128, BF16, False, True, False, False, False, WNA16GemmConfig(32, 16, 64, factored=False)),
    (4, 64, BF16, True, True, True, True, True, WNA16GemmConfig(16, 32, 64)),  # factored, gated
    (4, 256, F32, False, False, True, False, False, WNA16GemmConfig(32, 32, 128)),
    (8, 64, BF16, True, False, False, False, True, WNA16GemmConfig(16, 32, 32)),
    (8, 256, F32, False, True, False, False, False, WNA16GemmConfig(16, 16, 64, group_m=2)),
]


@pytest.mark.parametrize(("bits", "group", "dtype", "perm", "bias", "norm", "residual", "gated", "cfg"),
                         GEMM_CASES)
def test_gemm_matches_twin(bits: int, group: int, dtype: torch.dtype, perm: bool, bias: bool, norm: bool,
                           residual: bool, gated: bool, cfg: WNA16GemmConfig) -> None:
    n = 96 if gated else 40
    check(bits, 256, n, group, 40, dtype, perm=perm, bias=bias, norm=norm, residual=residual,
          gated=gated, gemm=cfg, seed=bits + group)


def test_default_dispatch_both_paths() -> None:
    # No config: T <= GEMV_DISPATCH_M takes the GEMV, larger T the GEMM, each with its table entry
    # (one-step K loop, masked chunks) at a small shape.
    check(4, 128, 32, 32, GEMV_DISPATCH_M, F32, bias=True, norm=True, residual=True, gated=True, seed=5)
    check(8, 128, 32, 128, GEMV_DISPATCH_M + 1, F32, perm=True, norm=True, residual=True, seed=6)


@pytest.mark.parametrize("m", [2, 20])
def test_strided_rows(m: int) -> None:
    # x / residual as column slices of wider buffers (row stride 2K): both kernels and the prologue
    g = torch.Generator(device=DEVICE).manual_seed(9)
    w = make_weight(4, 64, 32, 32, m > 4, F32, g)
    x = torch.randn(m, 128, generator=g, device=DEVICE)[:, :64]
    res = torch.randn(m, 128, generator=g, device=DEVICE)[:, 64:]
    nw = torch.rand(64, generator=g, device=DEVICE) + 0.5
    got = wna16_matmul(x, wna16_prepare(w), norm_weight=nw, residual=res, gemv_config=WNA16GemvConfig(8, block_k=32)
                       if m <= 4 else None)
    want = rq.wna16_matmul(x, w, norm_weight=nw, residual=res)
    assert isinstance(got, tuple) and isinstance(want, tuple)
    _close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_unsupported_groups_fall_back_and_empty_input() -> None:
    g = torch.Generator(device=DEVICE).manual_seed(7)
    w = make_weight(4, 64, 16, 8, False, F32, g)  # group 8: under tl.dot's K tile of 16
    prepared = wna16_prepare(w)
    assert prepared.fallback is w
    x = torch.randn(3, 64, generator=g, device=DEVICE)
    got, want = wna16_matmul(x, prepared), rq.wna16_matmul(x, w)
    assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and torch.equal(got, want)
    w = make_weight(8, 64, 16, 32, True, F32, g)
    empty = torch.zeros(0, 64, device=DEVICE)
    out = wna16_matmul(empty, wna16_prepare(w), gated=True)
    assert isinstance(out, torch.Tensor) and out.shape == (0, 8)


def test_prepare_layout_and_validation() -> None:
    g = torch.Generator(device=DEVICE).manual_seed(8)
    w = make_weight(4, 128, 24, 64, True, BF16, g)
    p = wna16_prepare(w)
    assert p.fallback is None and p.in_features == 128 and p.out_features == 24
    assert p.qweight.shape == (24, 16) and p.qweight.is_contiguous() and torch.equal(p.qweight, w.qweight.T)
    assert p.scales.shape == (24, 2) and torch.equal(p.scales, w.scales.T) and torch.equal(p.zeros, w.zeros.T)
    assert w.perm is not None and p.perm is not None and p.perm.dtype == torch.int32
    assert torch.equal(p.perm.long(), w.perm)
    with pytest.raises(ValueError, match="bad WNA16Weight"):
        wna16_prepare(w._replace(scales=w.scales[:1]))
    with pytest.raises(ValueError, match="perm must be"):
        wna16_prepare(w._replace(perm=w.perm[:5] if w.perm is not None else None))
    with pytest.raises(ValueError, match="x must be"):
        wna16_matmul(torch.zeros(1, 64, dtype=BF16, device=DEVICE), p)
    with pytest.raises(ValueError, match="residual must be"):
        wna16_matmul(torch.zeros(2, 128, dtype=BF16, device=DEVICE), p,
                     residual=torch.zeros(2, 128, dtype=BF16, device=DEVICE))
    with pytest.raises(ValueError, match="at most"):
        wna16_matmul(torch.zeros(GEMV_MAX_M + 1, 128, dtype=BF16, device=DEVICE), p,
                     gemv_config=WNA16GemvConfig(8))


LLAMA3_8B = [(6144, 4096, False), (4096, 4096, False), (14336, 4096, True), (4096, 14336, False)]


def test_launch_tables_are_deterministic_and_fill_the_gpu() -> None:
    # Llama-3-8B decode shapes: every GEMV config keeps ~8 programs per SM (counting splits)
    # and its accumulators within ~64 registers per thread; GEMM tiles divide the group sizes.
    for n, k, gated in LLAMA3_8B:
        for m in range(1, GEMV_MAX_M + 1):
            cfg = pick_gemv_config(m, n, k, gated=gated)
            assert cfg == pick_gemv_config(m, n, k, gated=gated)
            assert math.ceil(n / cfg.block_n) * cfg.split_k >= MIN_GEMV_PROGRAMS, (n, k, m, cfg)
            assert (2 if gated else 1) * (1 << (m - 1).bit_length()) * cfg.block_n <= 64, (n, k, m, cfg)
        if k >= 3 * n:  # tall K at one token: split, not thinned
            assert pick_gemv_config(1, n, k, gated=gated).split_k > 1
        for m in (16, 64, 256, 4096):
            gcfg = pick_gemm_config(m, n, k)
            assert gcfg.block_m >= 16 and 128 % gcfg.block_k == 0
    assert wna16_fused_max_tokens(gated=False) == wna16_fused_max_tokens(gated=True) == GEMV_DISPATCH_M
    # the default reach: 8 tokens for o_proj / down_proj, 4 for the wide (qkv) and gated ones
    assert [gemv_dispatch_m(n, k, gated=g) for n, k, g in LLAMA3_8B] == [4, 8, 4, 8]


def test_registry_plugs_in_the_triton_kernels() -> None:
    from pagedserve.kernels.registry import TORCH_KERNELS, get_kernel_set

    ks = get_kernel_set("triton")
    assert ks.wna16_prepare is wna16_prepare and ks.wna16_matmul is wna16_matmul
    assert ks.wna16_fused_max_tokens(gated=True) == GEMV_DISPATCH_M
    assert TORCH_KERNELS.wna16_fused_max_tokens(gated=False) == 0
    assert TORCH_KERNELS.wna16_prepare is rq.wna16_prepare


# ---------------------------------------------------------------------------------------------
# Real shapes on the GPU (skipped without CUDA), default launch tables
# ---------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64, 256])
@pytest.mark.parametrize(("bits", "group"), [(4, 128), (4, -1), (8, 32)])
def test_gpu_llama3_8b_shapes(m: int, bits: int, group: int) -> None:
    for i, (n, k, gated) in enumerate(LLAMA3_8B):
        grp = k if group == -1 else group  # -1: one group over all of K (GPTQ's group_size -1)
        norm = n == 6144 or gated
        check(bits, k, 2 * n if gated else n, grp, m, BF16, perm=i == 0, norm=norm, residual=norm,
              gated=gated, seed=20 + i)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_gpu_forced_gemv_and_gemm_at_decode_sizes(m: int) -> None:
    # both kernels at every decode size (the bench times both), float32 and float16 too
    check(4, 4096, 6144, 128, m, BF16, norm=True, residual=True, gemv=WNA16GemvConfig(4), seed=30)
    check(4, 14336, 4096, 128, m, BF16, gemv=WNA16GemvConfig(4, split_k=4), seed=31)
    check(8, 4096, 2 * 1000, 64, m, torch.float16, bias=True, gated=True, gemm=pick_gemm_config(m, 1000, 4096))
    check(4, 4096, 1000, 32, m, F32, bias=True, norm=True, perm=True, seed=32)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_gpu_cuda_graph_replay_matches_eager(m: int) -> None:
    # Captured once, replayed on new inputs written into the captured buffers: no host sync and no
    # data-dependent allocation (split-K partials, prologue buffers come from the graph's pool).
    g = torch.Generator(device=DEVICE).manual_seed(40 + m)
    w = wna16_prepare(make_weight(4, 4096, 2 * 2048, 128, True, BF16, g))
    x = torch.randn(m, 4096, generator=g, device=DEVICE).to(BF16)
    res = torch.randn(m, 4096, generator=g, device=DEVICE).to(BF16)
    nw = (torch.rand(4096, generator=g, device=DEVICE) + 0.5).to(BF16)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return wna16_matmul(x, w, norm_weight=nw, residual=res, gated=True)  # type: ignore[return-value]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, new_res = run()
    x.copy_(torch.randn(m, 4096, generator=g, device=DEVICE).to(BF16))
    res.copy_(torch.randn(m, 4096, generator=g, device=DEVICE).to(BF16))
    graph.replay()
    torch.cuda.synchronize()
    want, want_res = run()
    assert torch.equal(out, want) and torch.equal(new_res, want_res)
