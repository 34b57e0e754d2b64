"""Tensor-core int4 matmul with the weight as the MMA's left operand ("swap AB").

    y^T [N, M] = W^T [N, K] @ x^T [K, M]          M = tokens, BLOCK_M (16..128) of them a tile

Why transposed: on Hopper a wgmma takes its left operand from registers and only the right one
from shared memory, so the weight, dequantized in registers, feeds the tensor cores directly;
the small x^T tile is the shared-memory operand. (The dequantizing GEMM, wna16_gemm.py, has the
weight on the right and stores every dequantized element to shared memory, which at decode sizes
costs more than reading the weight; the CUDA-core GEMV spends about six instructions per
element.) Loops that contain a dot are software-pipelined by Triton, so the next weight tiles
are in flight while one is multiplied.

Layout (wna16_mma_pack): the weight is repacked so that each thread's registers, after the
unpack, already hold the MMA operand fragment. For row n and K step s of BLOCK_K (P = BLOCK_K /
32 words per 4 lanes), word c * P + p of the step holds in its nibble i = 4 b + 2 jj + h

    k = s * BLOCK_K + 32 p + 16 jj + 8 h + 2 c + b         c, b, jj, h in {0, 1} (c in 0..3)

which is the mma.m16n8k16 A fragment (lane % 4 = c holds k = 2c, 2c+1, 2c+8, 2c+9 of each
16-wide chunk). In the kernel the 8 unpacked tensors are joined as [BN, c, p, b, h, jj] and
permuted to [BN, p, jj, h, c, b], which is the natural k order: Triton then needs no layout
conversion between the unpack and the dot (checked in the compiled TTGIR: no local_alloc of the
weight tile). Nibbles m and m + 4 sit 16 bits apart, so one AND-OR puts two of them under the
bf16 exponent of 128 at once (0x4300 | q is bf16 128 + q), and one bf16x2 subtract gives

    (128 + q) - (128 + z) = q - z        exact in bf16 when the zero points are integers

(GPTQ and AWQ store integers; wna16.mma_eligible checks, else the other kernels run). The MMA
multiplies q - z by x in float32 and the group's scale multiplies its result (a K step lies in
one group); with the launch option `scaled`, a bf16x2 multiply puts the scale into the weight
instead ((q - z) * s rounded once to bf16, the rounding of a bf16 weight) and the MMA accumulates
across steps (slower at decode sizes: more instructions). zeros arrive as bf16 (128 + z). On
Hopper the unpack is inline PTX (per word three shifts, four LOP3, four bf16x2 subtracts, and four
multiplies when scaled); under TRITON_INTERPRET and on older GPUs (no bf16x2 subtract / multiply
in their PTX) the same values come from plain integer and float32 ops (bit-identical).

Split-K is serial and deterministic: each of SPLITS programs of a tile writes its float32
partial, takes a ticket from the tile's counter (acq_rel atomic), and the last one sums the
partials in split order, applies the bias and, for a gated [gate | up] weight, SiLU-and-mul,
writes y and resets the counter (one launch; the counters are zero between calls). A gated
program holds BLOCK_N / 2 gate rows and the same BLOCK_N / 2 up rows.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from pagedserve.kernels.triton.activation import silu_and_mul


def _dequant_asm(scaled: bool) -> str:
    """Inline PTX for one word: nibbles m and m + 4 -> bf16x2 (128 + q) by one LOP3, minus
    (128 + z) (exact: q - z), times s when scaled (one rounding to bf16, that of a bf16 weight);
    out: 8 bf16, $0..$7 = nibble 0..7. Operands: $8 the word, $9 the zero, $10 the scale."""
    pairs = range(4)
    lines = [f".reg .b32 t1, t2, t3, p0, p1, p2, p3, z2{', s2' if scaled else ''};", "mov.b32 z2, {$9, $9};"]
    lines += ["mov.b32 s2, {$10, $10};"] if scaled else []
    lines += [f"shr.u32 t{m}, $8, {4 * m};" for m in (1, 2, 3)]
    lines += [f"lop3.b32 p{m}, {'$8' if m == 0 else f't{m}'}, 0x000F000F, 0x43004300, 0xEA;" for m in pairs]
    lines += [f"sub.rn.bf16x2 p{m}, p{m}, z2;" for m in pairs]
    lines += [f"mul.rn.bf16x2 p{m}, p{m}, s2;" for m in pairs] if scaled else []
    lines += [f"mov.b32 {{${m}, ${m + 4}}}, p{m};" for m in pairs]
    return "{\n" + "\n".join(lines) + "\n}"


_DEQUANT_ASM = tl.constexpr(_dequant_asm(scaled=False))
_DEQUANT_SCALED_ASM = tl.constexpr(_dequant_asm(scaled=True))


@triton.jit
def _nibble(words, SHIFT: tl.constexpr, zf, sf):
    """The plain-ops twin of the PTX for one nibble: ((q - zero) * s) rounded once to bf16."""
    return ((((words >> SHIFT) & 15).to(tl.float32) - zf) * sf).to(tl.bfloat16)


@triton.jit
def _unpack(words, z, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr,
            USE_ASM: tl.constexpr):
    """words int32 [BN, 4, P]; z, s bf16 [BN, 1, 1] (z = 128 + an integer zero) -> bf16
    [BN, BLOCK_K] in k order: q - zero (exact) or, SCALED, (q - zero) * s rounded once."""
    if USE_ASM:
        zb = tl.broadcast_to(z, words.shape)
        if SCALED:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _DEQUANT_SCALED_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", [words, zb, tl.broadcast_to(s, words.shape)],
                dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _DEQUANT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [words, zb],
                dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        zf = z.to(tl.float32) - 128.0
        sf = s.to(tl.float32) if SCALED else 1.0
        v0 = _nibble(words, 0, zf, sf)
        v1 = _nibble(words, 4, zf, sf)
        v2 = _nibble(words, 8, zf, sf)
        v3 = _nibble(words, 12, zf, sf)
        v4 = _nibble(words, 16, zf, sf)
        v5 = _nibble(words, 20, zf, sf)
        v6 = _nibble(words, 24, zf, sf)
        v7 = _nibble(words, 28, zf, sf)
    return _arrange(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N, BLOCK_K)


@triton.jit
def _arrange(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The 8 nibble tensors [BN, 4, P] -> [BN, BLOCK_K] in k order (nibble i = 4 b + 2 jj + h):
    joined b innermost, then h, then jj -> [BN, c, p, b, h, jj], permuted to [BN, p, jj, h, c, b]."""
    jj0 = tl.join(tl.join(v0, v4), tl.join(v1, v5))
    jj1 = tl.join(tl.join(v2, v6), tl.join(v3, v7))
    full = tl.join(jj0, jj1)
    return tl.reshape(tl.permute(full, (0, 2, 5, 4, 1, 3)), [BLOCK_N, BLOCK_K])


@triton.jit
def _finish(acc, rn, n_ok, rm, m_ok, col0, N, b_ptr, out_ptr, stride_om,
            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
    """acc [BN, BM] float32 (weight rows rn) -> y[rm, columns] with bias and, gated, SiLU(gate) * up
    (rows 0..BN/2 are the gate rows of columns col0.., the rest their up rows)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if GATED:
        HALF: tl.constexpr = BLOCK_N // 2
        gate, up = tl.split(tl.permute(tl.reshape(acc, [2, HALF, BLOCK_M]), (1, 2, 0)))  # [HALF, BM]
        y = gate / (1.0 + tl.exp(-gate)) * up
        c = col0 + tl.arange(0, HALF)
        tl.store(out_ptr + rm[None, :] * stride_om + c[:, None], y.to(out_ptr.dtype.element_ty),
                 mask=(c < N)[:, None] & m_ok[None, :])
    else:
        tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, part_ptr, lock_ptr, out_ptr,
    M, N, K, K_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, USE_ASM: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Grid (cdiv(N, BN or BN / 2 gated), cdiv(M, BM), SPLITS). N: result columns (gated: the
    weight has 2 N rows, gate then up); part float32 [SPLITS, M, 2 N or N]; lock int32 [grid0 * grid1]."""
    P: tl.constexpr = BLOCK_K // 32
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    j = tl.arange(0, BLOCK_N)
    if GATED:
        col0 = pid_n * (BLOCK_N // 2)
        col = col0 + (j % (BLOCK_N // 2))
        rn = col + (j // (BLOCK_N // 2)) * N  # gate rows, then the same columns' up rows
        nr = 2 * N
    else:
        col0 = pid_n * BLOCK_N
        col = col0 + j
        rn = col
        nr = N
    n_ok = col < N
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rw = tl.arange(0, BLOCK_K // 8)
    rk = tl.arange(0, BLOCK_K)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        words = tl.load(w_ptr + rn64[:, None] * stride_wn + (k0 // 8 + rw)[None, :], mask=n_ok[:, None], other=0)
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + (k0 + rk)[:, None], mask=m_ok[None, :], other=0.0)
        g = k0 // GROUP  # a step lies in one group
        s = tl.load(s_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0)
        z = tl.load(z_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0)
        w = _unpack(tl.reshape(words, [BLOCK_N, 4, P]), z[:, None, None], s[:, None, None],
                    BLOCK_N, BLOCK_K, SCALED, USE_ASM)
        if SCALED:  # the scale in the bf16 weight; the MMA accumulates across steps
            acc = tl.dot(w, xt, acc)
        else:  # exact q - zero in the MMA, the scale on its float32 result
            dot = tl.dot(w, xt)  # [BN, BM] float32
            acc += s.to(tl.float32)[:, None] * dot
    if SPLITS == 1:
        _finish(acc, rn, n_ok, rm, m_ok, col0, N, b_ptr, out_ptr, stride_om, BLOCK_N, BLOCK_M, HAS_BIAS, GATED)
    else:
        tile = part_ptr + rm[None, :] * nr + rn[:, None]  # this tile in split 0
        ok = n_ok[:, None] & m_ok[None, :]
        tl.store(tile + pid_k * M * nr, acc, mask=ok)
        tl.debug_barrier()  # the whole tile is written before the ticket (release is cumulative)
        lock = lock_ptr + pid_n * tl.num_programs(1) + pid_m
        ticket = tl.atomic_add(lock, 1, sem="acq_rel")
        if ticket == SPLITS - 1:  # the last split of this tile: sum in split order, finish
            tl.debug_barrier()
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for split in range(SPLITS):
                total += tl.load(tile + split * M * nr, mask=ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock, 0)
            _finish(total, rn, n_ok, rm, m_ok, col0, N, b_ptr, out_ptr, stride_om, BLOCK_N, BLOCK_M,
                    HAS_BIAS, GATED)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, NR, stride_wn, stride_sn, stride_on,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Grid (cdiv(NR, BN), K / BK): out [NR, K] bf16 = the weight rows, dequantized as the MMA
    kernel's scaled path does (for prefill sizes, where cuBLAS on bf16 is faster than re-unpacking
    the weight for every token tile)."""
    P: tl.constexpr = BLOCK_K // 32
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < NR
    k0 = tl.program_id(1) * BLOCK_K
    rn64 = rn.to(tl.int64)
    words = tl.load(w_ptr + rn64[:, None] * stride_wn + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :],
                    mask=n_ok[:, None], other=0)
    g = k0 // GROUP
    s = tl.load(s_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0)
    z = tl.load(z_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0)
    w = _unpack(tl.reshape(words, [BLOCK_N, 4, P]), z[:, None, None], s[:, None, None],
                BLOCK_N, BLOCK_K, True, USE_ASM)
    tl.store(out_ptr + rn64[:, None] * stride_on + (k0 + tl.arange(0, BLOCK_K))[None, :], w, mask=n_ok[:, None])


# ---------------------------------------------------------------------------------------- host

PROGRAMS_PER_SM = 2  # split-K until the grid has this many programs per SM
# From this many tokens the weight is dequantized to bf16 once per call and multiplied by cuBLAS:
# the MMA kernel unpacks it again for every BLOCK_M tokens, which from here costs as much as
# writing and reading the bf16 copy (at 256 tokens: gate_up 181 us by the best MMA launch, bf16
# cuBLAS 101 us + ~75 us to write 235 MB; benchmarks/results/h200-2026-12-03-wna16-mma/).
DEQUANTIZE_MIN_TOKENS = 256


class MmaConfig(NamedTuple):
    block_m: int
    splits: int
    num_stages: int = 3
    num_warps: int = 4  # 4 per 64 weight rows (one warpgroup's wgmma)
    block_n: int = 64
    scaled: bool = True  # the scale in the bf16 weight (the MMA accumulates across K steps), or
    # False: on each step's float32 dot (q - zero exact in the MMA; fewer instructions)
    dequantize: bool = False  # bf16 weight once (a scratch buffer) + cuBLAS instead (prefill sizes)


def mma_block_k(k: int, group_size: int, max_block_k: int = 128) -> int:
    """The packing's K step: the largest power of two from max_block_k down to 32 dividing both
    K and the group (a step lies in one group; 0: none)."""
    bk = max_block_k
    while bk >= 32:
        if k % bk == 0 and group_size % bk == 0:
            return bk
        bk //= 2
    return 0


def wna16_mma_pack(q: Tensor, block_k: int) -> Tensor:
    """q int [K, N] values in [0, 16) -> int32 [N, K / 8] in this kernel's order (module doc)."""
    k, n = q.shape
    if block_k not in (32, 64, 128, 256) or k % block_k:
        raise ValueError(f"block_k must be 32, 64, 128 or 256 and divide K = {k}, got {block_k}")
    p = block_k // 32
    t = q.t().to(torch.int64).reshape(n, k // block_k, p, 2, 2, 4, 2)  # [N, step, p, jj, h, c, b]
    t = t.permute(0, 1, 5, 2, 6, 3, 4).reshape(n, k // 8, 8)  # word c*P + p, nibble 4b + 2jj + h
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (t << shifts).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def wna16_mma_unpack(words: Tensor, block_k: int) -> Tensor:
    """The inverse of wna16_mma_pack: int32 [N, K / 8] -> int32 [K, N] values in [0, 16)."""
    n, kw = words.shape
    k = kw * 8
    p = block_k // 32
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    t = (words.unsqueeze(-1) >> shifts) & 15  # [N, K/8, 8]: word c*P + p, nibble 4b + 2jj + h
    t = t.reshape(n, k // block_k, 4, p, 2, 2, 2)  # [N, step, c, p, b, jj, h]
    return t.permute(0, 1, 3, 5, 6, 2, 4).reshape(n, k).t().contiguous()  # [N, step, p, jj, h, c, b]


_LOCKS: dict[torch.device, Tensor] = {}
_SCRATCH: dict[torch.device, Tensor] = {}


def _locks(device: torch.device, size: int) -> Tensor:
    """Zeroed int32 tile counters shared by every call on device (each call leaves them zero);
    one buffer of at least 16384, so that it exists before any CUDA-graph capture begins."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < size:
        locks = _LOCKS[device] = torch.zeros(max(size, 1 << 14), dtype=torch.int32, device=device)
    return locks[:size]


def _scratch(device: torch.device, numel: int) -> Tensor:
    """A bf16 buffer of at least numel elements shared by every layer on device (grown to the
    largest weight; a layer's copy is dead once its matmul has run, and calls run in order)."""
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[device] = torch.empty(numel, dtype=torch.bfloat16, device=device)
    return buf[:numel]


@functools.cache
def _cuda_device(index: int) -> tuple[int, bool]:
    """(SM count, has sm_90's bf16x2 sub / mul) of CUDA device index, asked once."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, (props.major, props.minor) >= (9, 0)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _has_bf16x2_asm(device: torch.device) -> bool:
    """Inline PTX with bf16x2 sub / mul: compiled (not interpreted) on an NVIDIA GPU of sm_90+."""
    if device.type != "cuda" or torch.version.cuda is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _cuda_device(_cuda_index(device))[1]


def _sm_count(device: torch.device) -> int:
    return _cuda_device(_cuda_index(device))[0] if device.type == "cuda" else 4


def pick_mma_config(m: int, n_tiles: int, k: int, block_k: int, device: torch.device, *,
                    gated: bool = False) -> MmaConfig:
    """Launch parameters from the H200 sweep of 2026-12-03 (benchmarks/results/h200-2026-12-03-
    wna16-mma/, Llama-3-8B shapes): up to 64 tokens the scale on the float32 dot (fewer
    instructions than scaling the weight: 8-10% faster at 1-16 tokens), BLOCK_M 16 up to 16
    tokens and 32 up to 64, except a gated projection past 16 tokens (128 rows in 8 warps, the
    scale in the weight, K whole); K split in powers of two (at least 4 K steps a split) until
    the grid has PROGRAMS_PER_SM programs per SM; from DEQUANTIZE_MIN_TOKENS the bf16 copy +
    cuBLAS."""
    if m >= DEQUANTIZE_MIN_TOKENS:
        return MmaConfig(128, 1, dequantize=True)
    if gated and m > 16:  # not split: a split's float32 partials of 2N rows cost more (64 tokens: 2x)
        return MmaConfig(64 if m <= 64 else 128, 1, num_warps=8, block_n=128, scaled=True)
    cfg = MmaConfig(16 if m <= 16 else 32 if m <= 64 else 64, 1, scaled=False)
    tiles = n_tiles * triton.cdiv(m, cfg.block_m)
    steps = k // block_k
    splits = 1
    while tiles * splits < PROGRAMS_PER_SM * _sm_count(device) and steps // (2 * splits) >= 4:
        splits *= 2
    return cfg._replace(splits=splits)


def wna16_mma_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros128: Tensor, bias: Tensor | None,
                     *, group_size: int, block_k: int, gated: bool = False,
                     config: MmaConfig | None = None) -> Tensor:
    """x [M, K] bf16 @ the packed weight (qweight int32 [NR, K / 8], scales / zeros128 bf16 [NR, G],
    zeros128 = 128 + zero) -> [M, N] (gated: N = NR / 2, SiLU(gate) * up), plus bias [NR]."""
    m, k = x.shape
    nr = qweight.shape[0]
    n = nr // 2 if gated else nr
    cfg = config or pick_mma_config(m, triton.cdiv(n, 32 if gated else 64), k, block_k, x.device, gated=gated)
    if group_size % block_k:
        raise ValueError(f"a K step must lie in one group (group {group_size}, block_k {block_k})")
    use_asm = _has_bf16x2_asm(x.device)
    if cfg.dequantize:
        dense = _scratch(x.device, nr * k).view(nr, k)
        _dequant_kernel[(triton.cdiv(nr, 64), k // block_k)](
            qweight, scales, zeros128, dense, nr, qweight.stride(0), scales.stride(0), dense.stride(0),
            GROUP=group_size, BLOCK_N=64, BLOCK_K=block_k, USE_ASM=use_asm, num_warps=4,
        )
        y = torch.nn.functional.linear(x, dense, bias)
        return silu_and_mul(y) if gated else y
    tiles_n = triton.cdiv(n, cfg.block_n // 2 if gated else cfg.block_n)
    steps = k // block_k
    k_split = triton.cdiv(steps, cfg.splits) * block_k
    splits = triton.cdiv(k, k_split)
    tiles_m = triton.cdiv(m, cfg.block_m)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((splits, m, nr), dtype=torch.float32, device=x.device) if splits > 1 else out
    locks = _locks(x.device, tiles_n * tiles_m) if splits > 1 else out
    _mma_kernel[(tiles_n, tiles_m, splits)](
        x, qweight, scales, zeros128, bias if bias is not None else x, part, locks, out,
        m, n, k, k_split, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLITS=splits,
        HAS_BIAS=bias is not None, GATED=gated, USE_ASM=use_asm, SCALED=cfg.scaled,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
