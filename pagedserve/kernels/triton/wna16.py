"""Weight-only int4/int8 matmul on the GPU (twins: reference_quant.wna16_prepare / wna16_matmul).

    prepared = wna16_prepare(w)                  once per layer after loading (w: WNA16Weight)
    y = wna16_matmul(x, prepared, bias, norm_weight=, residual=, eps=, gated=)   the twin's contract

wna16_prepare transposes the canonical layout so that K is contiguous (the words themselves are
unchanged: value i of word j is still k = PF*j + i):

    canonical  qweight [K/PF, N]  scales / zeros [G, N]   ->   qweight [N, K/PF]  scales / zeros [N, G]
                                                               perm int32 [K] (or None)

int4 weights of a bf16 model with integer zero points (mma_eligible: what GPTQ and AWQ publish)
are instead repacked for the tensor-core kernel of wna16_mma.py, which serves them at every token
count (the weight as the MMA's register operand; from 256 tokens a bf16 copy + cuBLAS); the
prologue kernel below runs first where there is a norm or an act-order perm. For the others
(int8, float32 / fp16 models, real-valued zeros), token counts pick the kernel from fixed tables
(no autotuning: these run inside CUDA graphs, where a first call may compile but must not
benchmark; no host sync, allocations depend on shapes only):

  T <= gemv_dispatch_m  wna16_gemv._gemv_kernel (takes up to GEMV_MAX_M = 16 when forced):
                   CUDA-core dequantizing GEMV, lanes along K, the RMSNorm(+residual) prologue and
                   SiLU-and-mul epilogue fused (one launch), split-K (float32 partials + a reduce
                   launch) for tall K. Its cost per weight element is a mask, a subtract and one
                   FMA per token: past a few tokens it is compute bound. gemv_dispatch_m:
                   GEMV_DISPATCH_M (4) tokens, 8 for a plain projection no wider than tall.
  T >  gemv_dispatch_m  wna16_gemm._gemm_kernel: a dequantizing GEMM (tl.dot over [BK, BN]
                   tiles dequantized in registers; int4 + bf16 at up to 32 rows per tile: the
                   tile as exact 128 + q, scale and zero applied per in-group step), gated
                   epilogue and bias fused.
  act-order (perm), or a norm on the GEMM path: wna16_gemv._prologue_kernel first writes
                   x' = perm-gather(norm(x)) (one small launch), then the kernel above.

Why a dequantizing GEMM rather than dequantize-to-bf16 + cuBLAS for larger T: the separate
dequantization writes and cuBLAS re-reads the whole bf16 weight, 2 x K x N x 2 bytes on top of
reading the int4 one, so it can never be faster than bf16 F.linear itself, and over the decode
batch range (T = 16..256, where time is weight bytes) it is about 2x slower than bf16, the
opposite of what quantization is for; it also needs a K x N scratch buffer per layer. The fused
GEMM reads 4-bit weights once and its dequantization is shared by the BLOCK_M rows of a tile, so
it is cheapest exactly where cuBLAS on bf16 is bandwidth bound; at prefill sizes (compute bound)
both run on the tensor cores. benchmarks/wna16_bench.py times it against bf16 cuBLAS.

Shapes the kernels do not take (group_size not a multiple of 16, which no published checkpoint
uses) are kept in the canonical layout and multiplied by the twin (correct, slow).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from pagedserve.kernels import reference_quant
from pagedserve.kernels.reference_quant import WNA16Weight
from pagedserve.kernels.triton.wna16_gemm import _gemm_kernel
from pagedserve.kernels.triton.wna16_gemv import _gemv_kernel, _prologue_kernel, _splitk_reduce_kernel
from pagedserve.kernels.triton.wna16_mma import (
    MmaConfig,
    mma_block_k,
    wna16_mma_matmul,
    wna16_mma_pack,
    wna16_mma_unpack,
)

__all__ = ["GEMV_DISPATCH_M", "GEMV_DISPATCH_M_TALL", "GEMV_MAX_M", "MIN_GEMV_PROGRAMS", "PreparedWNA16",
           "WNA16GemmConfig", "WNA16GemvConfig", "gemv_dispatch_m", "pick_gemm_config", "pick_gemv_config",
           "wna16_fused_max_tokens", "wna16_matmul", "wna16_prepare"]

GEMV_MAX_M = 16  # the GEMV kernel takes 1..16 tokens; GEMV_DISPATCH_M of them go to it by default
GEMV_DISPATCH_M = 4


class PreparedWNA16(NamedTuple):
    qweight: Tensor  # int32 [NR, K / PF], K contiguous (mma_block_k: wna16_mma_pack's order)
    scales: Tensor  # [NR, G]
    zeros: Tensor  # [NR, G], scales' dtype (mma_block_k: 128 + zero, bf16)
    perm: Tensor | None  # int32 [K]: y = x[:, perm] @ W
    bits: int
    group_size: int
    fallback: WNA16Weight | None  # a shape the kernels do not take: the canonical weight (twin)
    mma_block_k: int = 0  # > 0: the tensor-core kernel's layout (wna16_mma.py) with this K step

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (32 // self.bits)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]


@dataclass(frozen=True, slots=True)
class WNA16GemvConfig:
    block_n: int  # weight rows per program (gated: columns of the result, gate + up rows each)
    num_warps: int = 4
    split_k: int = 1  # K ranges per row block (> 1: float32 partials + a reduce launch)
    block_k: int | None = None  # K per step; None: one word per thread (PF x 32 x warps)


@dataclass(frozen=True, slots=True)
class WNA16GemmConfig:
    block_m: int
    block_n: int
    block_k: int  # capped to the largest power of two (>= 16) dividing group_size
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8
    factored: bool = True  # int4 + bf16: tl.dot on 128 + q, scale / zero per step (wna16_gemm.py)


# GEMV rows (max M, config): first fit wins; BLOCK_N is an upper bound that pick_gemv_config
# lowers (or splits K, for tall K) until the grid fills the GPU. From the H200 launch sweep of
# 2026-12-02 (benchmarks/results/h200-2026-12-02-wna16/, int4 g128, Llama-3-8B shapes): 8 rows
# a program throughout (gated: 4 columns, gate + up rows each), 4 warps at M <= 2 and 2 above,
# tall K (down_proj) split in 4 at M <= 2; M > 8 takes the GEMM (faster at every shape there).
_GEMV_TABLE: tuple[tuple[int, WNA16GemvConfig], ...] = (
    (2, WNA16GemvConfig(8, num_warps=4)),
    (8, WNA16GemvConfig(8, num_warps=2)),
    (16, WNA16GemvConfig(2, num_warps=4)),
)
# Programs the grid should have: Triton 3.6 does not pipeline these (non-dot) loads, so the bytes
# in flight are one step's loads per resident warp; 512 (4096-wide projections at BLOCK_N 8)
# timed faster than thinner rows at 1024 programs in the sweep.
MIN_GEMV_PROGRAMS = 512
# The GEMV's reach by default: a projection no wider than it is tall (o_proj, down_proj) is read
# faster by the GEMV up to 8 tokens; wide ones (qkv, gate_up) by the GEMM past 4 (the sweep).
GEMV_DISPATCH_M_TALL = 8

# GEMM rows (max M, config): first fit wins (tensor-core tiles: BLOCK_M >= 16). Factored up to
# 32 rows (decode: dequantization is the cost and the extra [BM, BN] partial is small); larger
# tiles take the exact path, whose dequantization BLOCK_M rows share.
_GEMM_TABLE: tuple[tuple[int, WNA16GemmConfig], ...] = (
    (16, WNA16GemmConfig(16, 64, 128, num_warps=4, num_stages=3)),  # BLOCK_N by width (pick_gemm_config)
    (32, WNA16GemmConfig(32, 64, 128, num_warps=4, num_stages=3)),
    (64, WNA16GemmConfig(64, 64, 64, num_warps=4, num_stages=3, factored=False)),
    (128, WNA16GemmConfig(64, 128, 64, num_warps=4, num_stages=3, factored=False)),
    (1 << 62, WNA16GemmConfig(128, 128, 64, num_warps=8, num_stages=3, factored=False)),
)


def pick_gemv_config(m: int, n: int, k: int, *, gated: bool) -> WNA16GemvConfig:
    """Launch parameters of the GEMV for M tokens, N result columns over K (deterministic): the
    table's row, gated rows halved (gate and up rows per column), then BLOCK_N halved, or for
    tall K (K >= 3 N: down_proj) K split in 2 or 4, until there are MIN_GEMV_PROGRAMS programs."""
    cfg = next((c for max_m, c in _GEMV_TABLE if m <= max_m), None)
    if cfg is None:
        raise ValueError(f"no WNA16 GEMV config for M={m} (at most {GEMV_MAX_M})")
    block_n = max(1, cfg.block_n // 2) if gated else cfg.block_n
    split = 4 if k >= 3 * n and m <= 2 else cfg.split_k
    while triton.cdiv(n, block_n) * split < MIN_GEMV_PROGRAMS:
        if k >= 3 * n and split < 4:
            split *= 2
        elif block_n > 1:
            block_n //= 2
        else:
            break
    return WNA16GemvConfig(block_n, cfg.num_warps, split, cfg.block_k)


def pick_gemm_config(m: int, n: int, k: int) -> WNA16GemmConfig:
    """The table's row; at M <= 16 BLOCK_N follows the width (the sweep: 32 for 4096 columns,
    64 for 6144, 128 for 14336)."""
    del k
    cfg = next(c for max_m, c in _GEMM_TABLE if m <= max_m)
    if m <= 16:
        cfg = replace(cfg, block_n=32 if n <= 4096 else 64 if n < 8192 else 128)
    return cfg


def gemv_dispatch_m(n: int, k: int, *, gated: bool) -> int:
    """Most tokens the default dispatch sends to the GEMV for a plain N x K projection."""
    return GEMV_DISPATCH_M_TALL if not gated and n <= k else GEMV_DISPATCH_M


def wna16_fused_max_tokens(*, gated: bool) -> int:
    """Most tokens for which wna16_matmul folds the norm (and, gated, SiLU-and-mul) into the GEMV
    launch; above, a linear method may as well run the norm itself (same launch count)."""
    del gated
    return GEMV_DISPATCH_M


def mma_eligible(w: WNA16Weight) -> int:
    """The K step of the tensor-core kernel's layout for w, or 0 where it does not apply: it
    takes int4 weights of a bf16 model with integer zero points in (-128, 128) (GPTQ and AWQ
    store integers, 0..15, or 1..16 for GPTQ's v1 format; its bf16 128 + zero and q - zero are
    then exact) and a group of 32 or more that divides into its K steps."""
    if w.bits != 4 or w.scales.dtype != torch.bfloat16 or w.out_features % 2:
        return 0
    block_k = mma_block_k(w.in_features, w.group_size)
    zeros = w.zeros.float()
    integral = bool(torch.equal(zeros, zeros.round())) and bool(((zeros > -128) & (zeros < 128)).all())
    return block_k if integral else 0


def wna16_prepare(w: WNA16Weight) -> PreparedWNA16:
    """The canonical weight in this module's layout (new tensors; the caller drops the old): the
    tensor-core kernel's where mma_eligible, else the GEMV / GEMM one."""
    pf = 32 // w.bits
    k, n = w.in_features, w.out_features
    groups = k // w.group_size if w.group_size and k % w.group_size == 0 else -1
    if w.bits not in (4, 8) or groups < 1 or w.scales.shape != (groups, n) or w.zeros.shape != (groups, n):
        raise ValueError(f"bad WNA16Weight: bits {w.bits}, qweight {tuple(w.qweight.shape)}, group "
                         f"{w.group_size}, scales {tuple(w.scales.shape)}, zeros {tuple(w.zeros.shape)}")
    if w.perm is not None and w.perm.shape != (k,):
        raise ValueError(f"perm must be [{k}], got {tuple(w.perm.shape)}")
    perm = None if w.perm is None else w.perm.to(torch.int32).contiguous()
    block_k = mma_eligible(w)
    if block_k:
        return PreparedWNA16(
            qweight=wna16_mma_pack(reference_quant.unpack_along_rows(w.qweight, 4), block_k),
            scales=w.scales.t().contiguous(),
            zeros=(w.zeros.float() + 128).to(torch.bfloat16).t().contiguous(),
            perm=perm, bits=4, group_size=w.group_size, fallback=None, mma_block_k=block_k,
        )
    fallback = w if w.group_size % 16 != 0 or k % pf != 0 else None
    return PreparedWNA16(
        qweight=w.qweight.t().contiguous(),
        scales=w.scales.t().contiguous(),
        zeros=w.zeros.to(w.scales.dtype).t().contiguous(),
        perm=None if w.perm is None else w.perm.to(torch.int32).contiguous(),
        bits=w.bits, group_size=w.group_size, fallback=fallback,
    )


def _gemm_block_k(w: PreparedWNA16, cfg_k: int) -> int:
    bk = cfg_k
    while w.group_size % bk:
        bk //= 2
    return bk


def _prologue(x: Tensor, residual: Tensor | None, norm_weight: Tensor | None, eps: float,
              perm: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(x', new residual): x' = gather(perm, norm(x [+ residual])); new residual as the twin's."""
    m, k = x.shape
    xo = torch.empty((m, k), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(xo) if residual is not None else None
    res = residual if residual is not None else x
    _prologue_kernel[(m,)](
        x, res, norm_weight if norm_weight is not None else x, perm if perm is not None else x,
        xo, res_out if res_out is not None else xo,
        k, x.stride(0), res.stride(0), xo.stride(0), (res_out if res_out is not None else xo).stride(0),
        float(eps), BLOCK=min(triton.next_power_of_2(k), 4096),
        HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, HAS_PERM=perm is not None,
    )
    new_res = None if norm_weight is None else (res_out if res_out is not None else x)
    return xo, new_res


def _gemv(x: Tensor, w: PreparedWNA16, bias: Tensor | None, norm_weight: Tensor | None,
          residual: Tensor | None, eps: float, gated: bool, n: int,
          cfg: WNA16GemvConfig) -> tuple[Tensor, Tensor | None]:
    m, k = x.shape
    pf = 32 // w.bits
    block_k = cfg.block_k or pf * 32 * cfg.num_warps
    if block_k % pf or block_k & (block_k - 1):
        raise ValueError(f"block_k {block_k} must be a power of two and a multiple of {pf}")
    k_split = triton.cdiv(triton.cdiv(k, max(1, cfg.split_k)), block_k) * block_k
    splits = triton.cdiv(k, k_split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((splits, m, w.out_features), dtype=torch.float32, device=x.device) if splits > 1 else out
    res_out = torch.empty_like(x) if residual is not None else None
    res = residual if residual is not None else x
    m_pad = triton.next_power_of_2(m)
    ro = res_out if res_out is not None else out
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        x, res, norm_weight if norm_weight is not None else x, w.qweight, w.scales, w.zeros,
        bias if bias is not None else x, part, ro,
        m, n, k, w.scales.shape[1], k_split,
        x.stride(0), res.stride(0), w.qweight.stride(0), w.scales.stride(0), part.stride(-2), ro.stride(0),
        float(eps), 0x4B000000,
        BITS=w.bits, GROUP=w.group_size, M_PAD=m_pad, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        NORM_BLOCK=min(triton.next_power_of_2(k), max(32 * 32 * cfg.num_warps // m_pad, 128)),
        HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None,
        GATED=gated, SPLIT=splits > 1, num_warps=cfg.num_warps,
    )
    if splits > 1:
        block = min(triton.next_power_of_2(n), 1024)
        _splitk_reduce_kernel[(m, triton.cdiv(n, block))](
            part, bias if bias is not None else x, out, m, n, part.stride(1), out.stride(0),
            SPLITS=splits, BLOCK=block, HAS_BIAS=bias is not None, GATED=gated, num_warps=4,
        )
    new_res = None if norm_weight is None else (res_out if res_out is not None else x)
    return out, new_res


def _gemm(x: Tensor, w: PreparedWNA16, bias: Tensor | None, gated: bool, n: int,
          cfg: WNA16GemmConfig) -> Tensor:
    m, k = x.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_k = _gemm_block_k(w, cfg.block_k)
    if block_k < 16 or block_k % (32 // w.bits):
        raise ValueError(f"block_k {block_k} too small for tl.dot (group {w.group_size})")
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _gemm_kernel[grid](
        x, w.qweight, w.scales, w.zeros, bias if bias is not None else x, out,
        m, n, k, x.stride(0), w.qweight.stride(0), w.scales.stride(0), out.stride(0),
        BITS=w.bits, GROUP=w.group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        GROUP_M=cfg.group_m, HAS_BIAS=bias is not None, GATED=gated, IEEE=x.dtype == torch.float32,
        FACTORED=cfg.factored and w.bits == 4 and x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def wna16_matmul(x: Tensor, w: PreparedWNA16, bias: Tensor | None = None, *,
                 norm_weight: Tensor | None = None, residual: Tensor | None = None,
                 eps: float = 1e-6, gated: bool = False,
                 gemv_config: WNA16GemvConfig | None = None,
                 gemm_config: WNA16GemmConfig | None = None,
                 mma_config: MmaConfig | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """reference_quant.wna16_matmul on a prepared weight: x [T, K] -> y [T, N] (gated: [T, N/2]),
    with norm_weight (y, x [+ residual]). gemv_config / gemm_config force that kernel and its
    launch parameters (tests, tuning); otherwise T picks the kernel and the tables its config.
    A weight in the tensor-core layout (mma_block_k) takes wna16_mma at every T (mma_config
    forces its launch parameters), after the prologue kernel where there is a norm or a perm."""
    if w.fallback is not None or x.shape[0] == 0:
        return reference_quant.wna16_matmul(x, w.fallback or _canonical(w), bias, norm_weight=norm_weight,
                                            residual=residual, eps=eps, gated=gated)
    m, k = x.shape
    if k != w.in_features:
        raise ValueError(f"x must be [T, {w.in_features}], got {tuple(x.shape)}")
    if gated and w.out_features % 2:
        raise ValueError(f"a gated weight needs an even number of columns, got {w.out_features}")
    if residual is not None and (norm_weight is None or residual.shape != x.shape):
        raise ValueError(f"residual must be [{m}, {k}] beside norm_weight, got {tuple(residual.shape)}")
    # Kernels index the last dim with unit stride (no-ops for the usual contiguous tensors).
    x = x if x.stride(1) == 1 else x.contiguous()
    residual = residual if residual is None or residual.stride(1) == 1 else residual.contiguous()
    norm_weight = None if norm_weight is None else norm_weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if w.mma_block_k:
        return _mma_matmul(x, w, bias, norm_weight, residual, eps, gated, mma_config)
    n = w.out_features // 2 if gated else w.out_features
    reach = gemv_dispatch_m(n, k, gated=gated) if norm_weight is None else GEMV_DISPATCH_M
    use_gemv = gemm_config is None and (gemv_config is not None or m <= reach)
    if use_gemv and m > GEMV_MAX_M:
        raise ValueError(f"the GEMV takes at most {GEMV_MAX_M} tokens, got {m}")
    new_res: Tensor | None = None
    if w.perm is not None or (norm_weight is not None and not use_gemv):
        x, new_res = _prologue(x, residual, norm_weight, eps, w.perm)
        norm_weight = residual = None
    if use_gemv:
        cfg = gemv_config or pick_gemv_config(m, n, k, gated=gated)
        out, fused_res = _gemv(x, w, bias, norm_weight, residual, eps, gated, n, cfg)
        new_res = fused_res if fused_res is not None else new_res
    else:
        out = _gemm(x, w, bias, gated, n, gemm_config or pick_gemm_config(m, n, k))
    return out if new_res is None else (out, new_res)


def _mma_matmul(x: Tensor, w: PreparedWNA16, bias: Tensor | None, norm_weight: Tensor | None,
                residual: Tensor | None, eps: float, gated: bool,
                config: MmaConfig | None) -> Tensor | tuple[Tensor, Tensor]:
    if x.dtype != torch.bfloat16:
        raise ValueError(f"the tensor-core int4 kernel multiplies bf16 activations, got {x.dtype}")
    new_res: Tensor | None = None
    if w.perm is not None or norm_weight is not None:
        x, new_res = _prologue(x, residual, norm_weight, eps, w.perm)
    out = wna16_mma_matmul(x, w.qweight, w.scales, w.zeros, bias, group_size=w.group_size,
                           block_k=w.mma_block_k, gated=gated, config=config)
    return out if new_res is None else (out, new_res)


def _canonical(w: PreparedWNA16) -> WNA16Weight:
    """The prepared weight back in the canonical layout (the twin's; T = 0 and tests)."""
    perm = None if w.perm is None else w.perm.to(torch.int64)
    if w.mma_block_k:
        q = wna16_mma_unpack(w.qweight, w.mma_block_k)
        return WNA16Weight(reference_quant.pack_along_rows(q, 4), w.scales.t(), (w.zeros.float() - 128).to(
            w.scales.dtype).t(), perm, 4, w.group_size)
    return WNA16Weight(w.qweight.t(), w.scales.t(), w.zeros.t(), perm, w.bits, w.group_size)
