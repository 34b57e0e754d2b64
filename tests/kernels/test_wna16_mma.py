"""The tensor-core int4 kernel (kernels/triton/wna16_mma.py) and its dispatch from wna16.py, against
the twin reference_quant.wna16_matmul on the canonical weight.

Without a GPU it runs under TRITON_INTERPRET=1 (tests/kernels/conftest.py) at small shapes with
every option: K steps of 32..256 within a group, several steps per split, serial split-K (the
last split sums, the counters go back to zero), row and token tails, the gated [gate | up]
epilogue, bias, the norm / act-order prologue, scale in the weight or on the dot, and the
prefill path (the weight dequantized to bf16, then cuBLAS). Zero points are
integers (what GPTQ and AWQ store; the kernel needs them), scales bf16. The `gpu` tests repeat it
at Llama-3-8B shapes with the default launch choice, where the dequantization is inline PTX.

Tolerance: the twin dequantizes in float32; the kernel feeds bf16 weights (q - z exact, or
(q - z) * s rounded once) to the MMA, so bf16 results differ by a few bf16 ulps of the output.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels import reference_quant as rq  # noqa: E402
from pagedserve.kernels.triton import wna16_mma  # noqa: E402
from pagedserve.kernels.triton.wna16 import _canonical, mma_eligible, wna16_matmul, wna16_prepare  # noqa: E402
from pagedserve.kernels.triton.wna16_mma import (  # noqa: E402
    MmaConfig,
    mma_block_k,
    pick_mma_config,
    wna16_mma_pack,
    wna16_mma_unpack,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BF16 = torch.bfloat16
REL_TOL = 3e-2


def int_zero_weight(k: int, n: int, group: int, g: torch.Generator, *, perm: bool = False,
                    dtype: torch.dtype = BF16) -> rq.WNA16Weight:
    """Random int4 weight with integer zero points (0..16: GPTQ v1 reaches 16), scales ~ 1 / (16 sqrt(K))."""
    q = torch.randint(0, 16, (k, n), generator=g, device=DEVICE)
    scales = (torch.rand(k // group, n, generator=g, device=DEVICE) + 0.5) * (4 / (16 * math.sqrt(k)))
    zeros = torch.randint(0, 17, (k // group, n), generator=g, device=DEVICE).float()
    order = torch.randperm(k, generator=g, device=DEVICE) if perm else None
    return rq.WNA16Weight(rq.pack_along_rows(q, 4), scales.to(dtype), zeros.to(dtype), order, 4, group)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not got.isnan().any()
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= REL_TOL * scale + 1e-6, f"max error {err} vs max |want| {scale}"


@pytest.mark.parametrize("block_k", [32, 64, 128, 256])
def test_pack_unpack_round_trip(block_k: int) -> None:
    g = torch.Generator().manual_seed(block_k)
    q = torch.randint(0, 16, (512, 24), generator=g, dtype=torch.int32)
    words = wna16_mma_pack(q, block_k)
    assert words.shape == (24, 64) and words.dtype == torch.int32
    assert torch.equal(wna16_mma_unpack(words, block_k), q)


def test_pack_places_the_mma_fragment_in_one_word() -> None:
    # word c * P + p of a step holds k = 32 p + 16 jj + 8 h + 2 c + b in nibble 4 b + 2 jj + h
    k, block_k = 128, 128
    q = (torch.arange(k) % 16).view(k, 1).to(torch.int32)  # the value of row k is k % 16
    word = int(wna16_mma_pack(q, block_k)[0, 1 * 4 + 2])  # c = 1, p = 2
    nibbles = [(word >> (4 * i)) & 15 for i in range(8)]
    want = [(32 * 2 + 16 * jj + 8 * h + 2 * 1 + b) % 16 for b in (0, 1) for jj in (0, 1) for h in (0, 1)]
    assert nibbles == want


def test_block_k_lies_in_one_group() -> None:
    assert mma_block_k(4096, 128) == 128
    assert mma_block_k(4096, 64) == 64
    assert mma_block_k(4096, 4096) == 128  # one group over K
    assert mma_block_k(4096, 256, max_block_k=256) == 256
    assert mma_block_k(4096, 16) == 0  # no published checkpoint uses it: the other kernels take it
    assert mma_block_k(96, 32) == 32


def test_eligibility_and_the_layout_it_picks() -> None:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    w = int_zero_weight(256, 64, 128, g)
    prepared = wna16_prepare(w)
    assert mma_eligible(w) == 128 and prepared.mma_block_k == 128
    assert prepared.in_features == 256 and prepared.out_features == 64
    back = _canonical(prepared)  # the layout holds exactly the canonical weight
    torch.testing.assert_close(rq.dequantize_wna16(back), rq.dequantize_wna16(w), rtol=0, atol=0)
    # non-integer zeros, float32 or fp16 models, int8 and group 16 keep the GEMV / GEMM layout
    assert mma_eligible(w._replace(zeros=w.zeros + 0.5)) == 0
    assert mma_eligible(w._replace(zeros=w.zeros + 1)) == 128  # GPTQ v1's zeros reach 16
    assert mma_eligible(w._replace(zeros=w.zeros + 120)) == 0
    assert mma_eligible(w._replace(scales=w.scales.float(), zeros=w.zeros.float())) == 0
    assert mma_eligible(w._replace(scales=w.scales.half(), zeros=w.zeros.half())) == 0
    w16 = int_zero_weight(256, 64, 16, g)
    assert mma_eligible(w16) == 0 and wna16_prepare(w16).mma_block_k == 0
    w8 = rq.WNA16Weight(rq.pack_along_rows(torch.randint(0, 256, (256, 64), device=DEVICE), 8),
                        w.scales, w.zeros, None, 8, 128)
    assert mma_eligible(w8) == 0


# K = 512 with block_k 128 (group 128) = 4 steps; N = 96 -> a ragged 64-row tile (gated: 48 columns
# in tiles of 32); M up to 40 -> padded and multi-tile token blocks; splits 1..4.
CASES = [
    # k, group, m, gated, bias, norm, residual, perm, config
    (512, 128, 1, False, False, False, False, False, MmaConfig(16, 1)),
    (512, 128, 3, True, True, False, False, False, MmaConfig(16, 2)),
    (512, 128, 5, False, True, True, True, False, MmaConfig(16, 4, scaled=False)),
    (512, 64, 17, True, False, True, False, True, MmaConfig(16, 2)),
    (512, 32, 40, False, False, False, False, True, MmaConfig(32, 1, scaled=False)),
    (512, 256, 2, True, False, True, True, False, MmaConfig(16, 2, block_n=128, num_warps=8)),
    (512, 512, 9, False, True, False, False, False, MmaConfig(64, 2)),
    (384, 128, 1, True, True, True, True, True, None),  # default launch choice
    (512, 64, 6, True, True, True, True, True, MmaConfig(128, 1, dequantize=True)),  # bf16 copy + cuBLAS
    (512, 128, 3, False, False, False, False, False, MmaConfig(128, 1, dequantize=True)),
]


@pytest.mark.parametrize(("k", "group", "m", "gated", "bias", "norm", "residual", "perm", "cfg"), CASES)
def test_mma_matches_twin(k: int, group: int, m: int, gated: bool, bias: bool, norm: bool, residual: bool,
                          perm: bool, cfg: MmaConfig | None) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(k + group + m)
    n = 96
    w = int_zero_weight(k, n, group, g, perm=perm)
    prepared = wna16_prepare(w)
    assert prepared.mma_block_k > 0
    x = torch.randn(m, k, generator=g, device=DEVICE).to(BF16)
    b = torch.randn(n, generator=g, device=DEVICE).to(BF16) if bias else None
    kwargs: dict = {"gated": gated}
    if norm:
        kwargs["norm_weight"] = (torch.rand(k, generator=g, device=DEVICE) + 0.5).to(BF16)
        kwargs["residual"] = torch.randn(m, k, generator=g, device=DEVICE).to(BF16) if residual else None
    want = rq.wna16_matmul(x, w, b, **kwargs)
    for _ in range(2):  # the second call finds the split-K counters back at zero
        got = wna16_matmul(x, prepared, b, mma_config=cfg, **kwargs)
        if norm:
            assert isinstance(got, tuple) and isinstance(want, tuple)
            _close(got[0], want[0])
            if residual:
                torch.testing.assert_close(got[1], want[1], rtol=2**-7, atol=0)
            else:
                assert got[1] is x
        else:
            assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
            _close(got, want)
    assert all(int(locks.abs().sum()) == 0 for locks in wna16_mma._LOCKS.values())


def test_scale_in_weight_and_on_dot_agree() -> None:
    g = torch.Generator(device=DEVICE).manual_seed(7)
    w = wna16_prepare(int_zero_weight(256, 64, 128, g))
    x = torch.randn(4, 256, generator=g, device=DEVICE).to(BF16)
    a = wna16_matmul(x, w, mma_config=MmaConfig(16, 1, scaled=True))
    b = wna16_matmul(x, w, mma_config=MmaConfig(16, 2, scaled=False))
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    _close(a, b)


def test_empty_batch_and_wrong_dtype() -> None:
    g = torch.Generator(device=DEVICE).manual_seed(3)
    w = wna16_prepare(int_zero_weight(256, 64, 128, g))
    out = wna16_matmul(torch.empty(0, 256, device=DEVICE, dtype=BF16), w, gated=True)
    assert isinstance(out, torch.Tensor) and out.shape == (0, 32)
    with pytest.raises(ValueError, match="bf16 activations"):
        wna16_matmul(torch.randn(2, 256, device=DEVICE), w)
    with pytest.raises(ValueError, match="one group"):
        wna16_mma.wna16_mma_matmul(torch.randn(1, 256, device=DEVICE).to(BF16), w.qweight, w.scales, w.zeros,
                                   None, group_size=64, block_k=128)


def test_pick_config_splits_until_the_grid_fills() -> None:
    cpu = torch.device("cpu")  # 4 "SMs" on the CPU: 8 programs wanted
    assert pick_mma_config(1, 2, 4096, 128, cpu) == MmaConfig(16, 4, scaled=False)
    assert pick_mma_config(1, 64, 4096, 128, cpu).splits == 1
    assert pick_mma_config(40, 1, 1024, 128, cpu) == MmaConfig(32, 2, scaled=False)  # >= 4 steps a split
    assert pick_mma_config(40, 4, 4096, 128, cpu, gated=True) == MmaConfig(64, 1, 3, 8, 128, True)
    assert pick_mma_config(200, 1, 4096, 128, cpu).block_m == 64
    assert not pick_mma_config(255, 1, 4096, 128, cpu).dequantize
    assert pick_mma_config(256, 1, 4096, 128, cpu).dequantize


# ---------------------------------------------------------------------------------------------
# The GPU: Llama-3-8B shapes, default launch choice, compiled (inline PTX on sm_90+)
# ---------------------------------------------------------------------------------------------

LLAMA3_8B = [(6144, 4096, False), (4096, 4096, False), (14336, 4096, True), (4096, 14336, False)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64, 256, 1024])
@pytest.mark.parametrize("group", [128, -1, 32])
def test_gpu_llama3_8b_shapes(m: int, group: int) -> None:
    for i, (n, k, gated) in enumerate(LLAMA3_8B):
        g = torch.Generator(device=DEVICE).manual_seed(50 + i)
        w = int_zero_weight(k, 2 * n if gated else n, k if group == -1 else group, g, perm=i == 0)
        prepared = wna16_prepare(w)
        assert prepared.mma_block_k
        x = torch.randn(m, k, generator=g, device=DEVICE).to(BF16)
        norm = n == 6144 or gated
        kwargs: dict = {"gated": gated}
        if norm:
            kwargs["norm_weight"] = (torch.rand(k, generator=g, device=DEVICE) + 0.5).to(BF16)
            kwargs["residual"] = torch.randn(m, k, generator=g, device=DEVICE).to(BF16)
        got = wna16_matmul(x, prepared, **kwargs)
        want = rq.wna16_matmul(x, w, **kwargs)
        if norm:
            _close(got[0], want[0])  # type: ignore[index]
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # type: ignore[index]
        else:
            _close(got, want)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_cuda_graph_replay_matches_eager(m: int) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(60 + m)
    w = wna16_prepare(int_zero_weight(4096, 4096, 128, g))  # split-K at small m
    x = torch.randn(m, 4096, generator=g, device=DEVICE).to(BF16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        wna16_matmul(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = wna16_matmul(x, w)
    for seed in range(3):
        x.copy_(torch.randn(m, 4096, generator=torch.Generator(device=DEVICE).manual_seed(seed),
                            device=DEVICE).to(BF16))
        graph.replay()
        eager = wna16_matmul(x, w)
        assert isinstance(out, torch.Tensor) and isinstance(eager, torch.Tensor)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
