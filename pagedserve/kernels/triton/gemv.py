"""Triton GEMV for decode (M <= 8 tokens) with the neighbours fused in (twin: reference.fused_gemv_reference).

    out[M, N] = prologue(x)[M, K] @ weight[N, K].T (+ bias)          weight: nn.Linear layout
    prologue  = rms_norm(x [+ residual]) * norm_weight  (optional; HF Llama rounding order)
    epilogue  = silu(gate) * up over weight = [gate rows | up rows]   (optional, gated=True)
    weight    = the model dtype, or float8_e4m3fn with weight_scale (per tensor or per row: it
                factors out of each dot product, so it scales the float32 sums once, after the
                loop): FP8 checkpoints decode reading one byte per weight

Small-batch decode is bandwidth bound: the weight is read once and every other byte is noise. One
program owns BLOCK_N output columns and walks all of K (no split-K, so no memset or reduce kernel):

    weight [N, K]             program p reads rows [p*BN, p*BN + BN) (gated: also rows I + those)
    +------------------+      one K step = BK columns = 32 lanes x num_warps x VEC-element vectors
    | p=0 |w0 w1 w2 w3|...    (VEC * element size = 16 bytes): all warps sit along K, the BN rows
    | p=1 |           |...    and the M_PAD tokens are registers of each thread, so a thread loads
    | ... |           |       its x vectors once per step and reuses them for all BN rows.
    +------------------+
                              acc [M_PAD, BN, BK // VEC] float32: each step adds the in-thread sum
                              over its VEC products; lanes and warps are summed once, after the loop.

BLOCK_K >= 32 * num_warps * VEC keeps every warp along K (then x, weight and the accumulator share
one layout and the loop has no shared-memory traffic). No tl.dot: M is tiny, and for float32
models tl.dot would round through TF32. With the norm prologue each program first sums the squares
of its x rows (x is a few KB, L2-resident), then normalises every x tile again in the main loop;
program 0 alone writes the residual sum.

Launch parameters come from a small table (pick_config) tuned on an H200, never from autotuning:
these kernels run inside CUDA graphs, where the first call may compile but must not benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import torch
import triton
import triton.language as tl

MAX_M = 8
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int  # output columns per program (gated: columns of the [M, I] result)
    block_k: int  # K elements per loop step
    num_warps: int = 4
    prefetch: bool = False  # load step i+1 before step i's FMAs (no gain measured on H200)
    num_stages: int = 1  # passed through; Triton 3.6 does not pipeline these (non-dot) loads


# Rows (max M, kind, max N of the result, config); the first row that fits wins. kind: "plain",
# "norm" (norm prologue, not gated) or "gated". Tuned on an H200 (bf16, Llama-3-8B decode shapes:
# qkv 6144x4096 norm, o 4096x4096, gate_up 2x14336x4096 gated, down 4096x14336, lm_head
# 128256x4096) with benchmarks/gemv_bench.py --sweep; within ~3% of the best candidate at each.
# Why they differ: the norm prologue is redone by every program, so "norm" wants fewer, taller
# programs (BN 8-16); plain o/down at M = 1 like many thin ones (BN 1, 4096 programs).
_TABLE: tuple[tuple[int, str, int, GemvConfig], ...] = (
    (1, "plain", 16384, GemvConfig(1, 2048)),
    (1, "plain", 1 << 62, GemvConfig(4, 512, num_warps=2)),
    (1, "norm", 1 << 62, GemvConfig(8, 1024)),
    (1, "gated", 1 << 62, GemvConfig(4, 1024)),
    (2, "plain", 16384, GemvConfig(4, 1024)),
    (2, "plain", 1 << 62, GemvConfig(8, 512, num_warps=2)),
    (2, "norm", 1 << 62, GemvConfig(16, 1024)),
    (2, "gated", 1 << 62, GemvConfig(4, 512, num_warps=2)),
    (4, "plain", 16384, GemvConfig(8, 1024)),
    (4, "plain", 1 << 62, GemvConfig(8, 512, num_warps=2)),
    (4, "norm", 1 << 62, GemvConfig(8, 512, num_warps=2)),
    (4, "gated", 1 << 62, GemvConfig(4, 512, num_warps=2)),
    (8, "plain", 1 << 62, GemvConfig(4, 512, num_warps=2)),
    (8, "norm", 1 << 62, GemvConfig(8, 512, num_warps=2)),
    (8, "gated", 1 << 62, GemvConfig(4, 512, num_warps=2)),
)


def pick_config(n: int, k: int, m: int, *, norm: bool, gated: bool) -> GemvConfig:
    """Launch parameters for a result of N columns over K at M tokens (deterministic, no timing).
    K does not enter yet: the K step is fixed by the lane layout, and programs scale with N."""
    del k
    kind = "gated" if gated else "norm" if norm else "plain"
    for max_m, row_kind, max_n, cfg in _TABLE:
        if m <= max_m and kind == row_kind and n <= max_n:
            return cfg
    raise ValueError(f"no GEMV config for N={n}, M={m}, kind={kind}")


def prefer_fused_gemv(m: int, *, norm: bool, gated: bool) -> bool:
    """Whether fused_gemv beats the unfused path (Triton norm + cuBLAS + Triton SiLU-and-mul) at
    M tokens, from H200 measurements at Llama-3-8B shapes (benchmarks/gemv_bench.py). Beyond
    these M the FMAs, and above all the norm prologue that every program redoes (about 10
    operations per x element), make the kernel compute bound: a gated layer at M = 2 only ties,
    norm + qkv loses from M = 4, and a plain GEMV ties cuBLAS at M = 4 and loses at M = 8."""
    return m <= (1 if gated else 2 if norm else 4)


@triton.jit
def _load(ptrs, k0, k3, K, EVEN_K: tl.constexpr):
    """The K tile at offset k0 of ptrs [.., BK] (k3 = arange(BK) broadcast), zero past K."""
    if EVEN_K:
        return tl.load(ptrs + k0)
    return tl.load(ptrs + k0, mask=(k0 + k3) < K, other=0.0)


@triton.jit
def _gemv_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, res_out_ptr,
    M, N, K,  # N: columns of the result (I when gated; the up rows start at weight row N)
    stride_x, stride_res, stride_w, stride_out, stride_res_out,
    eps,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    GATED: tl.constexpr, EVEN_K: tl.constexpr, VEC: tl.constexpr, PREFETCH: tl.constexpr,
    W_SCALE: tl.constexpr,  # 0: none, 1: one float32 for the tensor, 2: one per weight row
):
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    # Padded rows/columns re-read the last valid one instead of masking the hot loads; they are
    # never stored.
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)

    # Loads are [.., BK] (one contiguous axis, so each thread gets whole 16-byte vectors); the
    # tile is then viewed as [.., BK // VEC, VEC] so that the per-step sum over VEC is in-thread
    # FMAs and the lane/warp sum over BK // VEC waits until after the loop.
    k3 = tl.arange(0, BLOCK_K)[None, None, :]  # [1, 1, BK]
    x_ptrs = x_ptr + rows_m[:, None, None] * stride_x + k3  # [M_PAD, 1, BK]
    r_ptrs = res_ptr + rows_m[:, None, None] * stride_res + k3
    w_ptrs = w_ptr + rows_n[None, :, None] * stride_w + k3  # [1, BN, BK]
    u_ptrs = w_ptrs + N * stride_w  # up rows (GATED only)
    if PREFETCH:
        # Register double buffer: step i's FMAs overlap step i+1's loads, and the first weight
        # tile is in flight during the norm prologue. A load past K is masked off (no traffic).
        w_nxt = _load(w_ptrs, 0, k3, K, False)
        u_nxt = _load(u_ptrs, 0, k3, K, False) if GATED else w_nxt
        a_nxt = _load(x_ptrs, 0, k3, K, False)
        r_nxt = _load(r_ptrs, 0, k3, K, False) if HAS_RESIDUAL else a_nxt

    if HAS_NORM:
        # Pass 1: per-row sum of squares of s = x (+ residual), s rounded to dtype first.
        kk = tl.arange(0, NORM_BLOCK)[None, :]  # [1, NORM_BLOCK]
        ss = tl.zeros([M_PAD, NORM_BLOCK], dtype=tl.float32)
        for k0 in range(0, K, NORM_BLOCK):
            kmask = (k0 + kk) < K
            s = tl.load(x_ptr + rows_m[:, None] * stride_x + k0 + kk, mask=kmask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + rows_m[:, None] * stride_res + k0 + kk, mask=kmask, other=0.0)
                s = (s.to(tl.float32) + r.to(tl.float32)).to(dtype)
                # The one writer of the new residual stream (a separate buffer: others read x).
                # (rows < writer_rows rather than `& (pid == 0)`: a scalar bool in a block mask
                # is rejected by newer Triton interpreters)
                writer_rows = tl.where(pid == 0, M, 0)
                smask = kmask & (offs_m[:, None] < writer_rows)
                tl.store(res_out_ptr + offs_m[:, None] * stride_res_out + k0 + kk, s, mask=smask)
            sf = s.to(tl.float32)
            ss += sf * sf
        rstd = tl.rsqrt(tl.sum(ss, axis=1) / K + eps)[:, None, None]  # [M_PAD, 1, 1]

    acc = tl.zeros([M_PAD, BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    acc_u = tl.zeros([M_PAD, BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if PREFETCH:
            w, wu, a, r = w_nxt, u_nxt, a_nxt, r_nxt
            w_nxt = _load(w_ptrs, k0 + BLOCK_K, k3, K, False)
            if GATED:
                u_nxt = _load(u_ptrs, k0 + BLOCK_K, k3, K, False)
            a_nxt = _load(x_ptrs, k0 + BLOCK_K, k3, K, False)
            if HAS_RESIDUAL:
                r_nxt = _load(r_ptrs, k0 + BLOCK_K, k3, K, False)
        else:
            w = _load(w_ptrs, k0, k3, K, EVEN_K)
            wu = _load(u_ptrs, k0, k3, K, EVEN_K) if GATED else w
            a = _load(x_ptrs, k0, k3, K, EVEN_K)
            r = _load(r_ptrs, k0, k3, K, EVEN_K) if HAS_RESIDUAL else a
        if HAS_RESIDUAL:
            a = (a.to(tl.float32) + r.to(tl.float32)).to(dtype)
        if HAS_NORM:
            # (s * rstd) -> dtype, * norm_weight -> dtype: reference.rms_norm's two roundings.
            g = _load(nw_ptr + k3, k0, k3, K, EVEN_K)
            a = (a.to(tl.float32) * rstd).to(dtype)
            a = (a.to(tl.float32) * g.to(tl.float32)).to(dtype)
        af = tl.reshape(a.to(tl.float32), [M_PAD, 1, BLOCK_K // VEC, VEC])
        wf = tl.reshape(w.to(tl.float32), [1, BLOCK_N, BLOCK_K // VEC, VEC])
        acc += tl.sum(af * wf, axis=3)
        if GATED:
            uf = tl.reshape(wu.to(tl.float32), [1, BLOCK_N, BLOCK_K // VEC, VEC])
            acc_u += tl.sum(af * uf, axis=3)
    y = tl.sum(acc, axis=2)  # [M_PAD, BN]
    if GATED:
        up = tl.sum(acc_u, axis=2)
    if W_SCALE == 1:
        ws = tl.load(ws_ptr)
        y = y * ws
        if GATED:
            up = up * ws
    elif W_SCALE == 2:
        y = y * tl.load(ws_ptr + rows_n)[None, :]
        if GATED:
            up = up * tl.load(ws_ptr + N + rows_n)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows_n)[None, :].to(tl.float32)
    if GATED:
        if HAS_BIAS:
            up += tl.load(b_ptr + N + rows_n)[None, :].to(tl.float32)
        y = y / (1.0 + tl.exp(-y)) * up  # silu(gate) * up in float32, rounded once below
    omask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], y.to(dtype), mask=omask)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory t can touch (strides are non-negative)."""
    start = t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of a and b intersect (conservative for strided tensors)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _check_vector(name: str, t: torch.Tensor | None, size: int, x: torch.Tensor) -> None:
    if t is None:
        return
    if t.shape != (size,) or t.dtype != x.dtype or t.device != x.device or t.stride(0) != 1:
        raise ValueError(
            f"{name} must be a contiguous [{size}] {x.dtype} tensor on {x.device}, "
            f"got {tuple(t.shape)} {t.dtype} on {t.device}"
        )


def _check_matrix(name: str, t: torch.Tensor, shape: tuple[int, int], x: torch.Tensor) -> None:
    if t.shape != shape or t.dtype != x.dtype or t.device != x.device or t.stride(1) != 1:
        raise ValueError(
            f"{name} must be a {list(shape)} {x.dtype} tensor on {x.device} with a contiguous last "
            f"dimension, got {tuple(t.shape)} {t.dtype} on {t.device} strides {t.stride()}"
        )


@overload
def fused_gemv(
    x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
    norm_weight: None = None, residual: None = None, eps: float = 1e-6, gated: bool = False,
    out: torch.Tensor | None = None, residual_out: None = None, config: GemvConfig | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor: ...
@overload
def fused_gemv(
    x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor, residual: torch.Tensor | None = None, eps: float = 1e-6,
    gated: bool = False, out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
    config: GemvConfig | None = None, weight_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def fused_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (1 <= M <= 8) @ weight [N, K].T (+ bias [N]) in one kernel, float32 accumulate.

    norm_weight [K]: x is first replaced by rms_norm(x [+ residual]) * norm_weight; returns
    (out, s) with s = x + residual (written to residual_out, a fresh buffer by default) or s = x
    itself without a residual. gated: weight [2*I, K] = [gate | up], out [M, I] =
    silu(gate) * up. All tensors share x's dtype (bf16, fp16 or fp32) and device; config overrides
    the launch table (tuning and tests). Outputs may not alias any input. weight_scale: weight is
    float8_e4m3fn standing for weight * weight_scale, a contiguous float32 [] / [1] (per tensor) or
    [N] (per weight row) on x's device.
    """
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M or x.stride(1) != 1:
        raise ValueError(f"x must be [M, K] with 1 <= M <= {MAX_M} and contiguous K, got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be one of {_DTYPES}, got {x.dtype}")
    m, k = x.shape
    if weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] == 0:
        raise ValueError(f"weight must be [N, {k}] with N > 0, got {tuple(weight.shape)}")
    w_scale_kind = 0
    if weight_scale is None:
        _check_matrix("weight", weight, (weight.shape[0], k), x)
    else:
        if weight.dtype != torch.float8_e4m3fn or weight.device != x.device or weight.stride(1) != 1:
            raise ValueError(f"with weight_scale, weight must be float8_e4m3fn on {x.device} with a contiguous "
                             f"last dimension, got {weight.dtype} on {weight.device} strides {weight.stride()}")
        rows = weight_scale.numel()
        if (weight_scale.dtype != torch.float32 or weight_scale.device != x.device
                or rows not in (1, weight.shape[0]) or not weight_scale.is_contiguous()):  # fmt: skip
            raise ValueError(f"weight_scale must be a contiguous float32 [] / [1] or [{weight.shape[0]}] tensor on "
                             f"{x.device}, got {tuple(weight_scale.shape)} {weight_scale.dtype} on {weight_scale.device}")
        w_scale_kind = 1 if rows == 1 and weight.shape[0] != 1 else 2
    if gated and weight.shape[0] % 2 != 0:
        raise ValueError(f"gated weight must have 2*I rows, got {weight.shape[0]}")
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    _check_vector("bias", bias, weight.shape[0], x)
    _check_vector("norm_weight", norm_weight, k, x)
    if norm_weight is None and (residual is not None or residual_out is not None):
        raise ValueError("residual / residual_out need norm_weight (the residual add feeds the norm)")
    if residual is None and residual_out is not None:
        raise ValueError("residual_out is only written when a residual is given")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if residual is not None:
        _check_matrix("residual", residual, (m, k), x)
        if residual_out is None:
            residual_out = torch.empty_like(x)
        _check_matrix("residual_out", residual_out, (m, k), x)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _check_matrix("out", out, (m, n), x)
    inputs = [t for t in (x, weight, bias, norm_weight, residual, weight_scale) if t is not None]
    for name, o in (("out", out), ("residual_out", residual_out)):
        if o is not None and any(_overlaps(o, t) for t in inputs):
            raise ValueError(f"{name} must not overlap an input (other programs still read them)")
    if residual_out is not None and _overlaps(out, residual_out):
        raise ValueError("out and residual_out must not overlap")

    cfg = config or pick_config(n, k, m, norm=norm_weight is not None, gated=gated)
    m_pad = triton.next_power_of_2(m)
    # Pass-1 tile: the whole row when it fits ~32 float32 registers per thread.
    norm_block = min(triton.next_power_of_2(k), max(32 * 32 * cfg.num_warps // m_pad, 128))
    res = residual if residual is not None else x
    res_out = residual_out if residual_out is not None else out
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, res, norm_weight if norm_weight is not None else x, weight,
        weight_scale if weight_scale is not None else x, bias if bias is not None else x, out, res_out,
        m, n, k,
        x.stride(0), res.stride(0), weight.stride(0), out.stride(0), res_out.stride(0),
        float(eps),
        M_PAD=m_pad, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NORM_BLOCK=norm_block,
        HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None,
        HAS_RESIDUAL=residual is not None, GATED=gated, EVEN_K=k % cfg.block_k == 0,
        VEC=16 // x.element_size(), PREFETCH=cfg.prefetch, W_SCALE=w_scale_kind, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if norm_weight is None:
        return out
    return out, (residual_out if residual_out is not None else x)
