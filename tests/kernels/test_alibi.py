"""ALiBi in the Triton paged attention kernels (decode and prefill, through the dispatcher)
against the plain-torch twin, under TRITON_INTERPRET=1 on CPU (conftest.py), small sizes; and the
twin itself against an explicit softmax(scores + slope * (j - i)) written here."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels import reference as ref  # noqa: E402
from pagedserve.kernels.triton.attention import paged_attention  # noqa: E402
from tests.kernels.test_triton_kernels import SMALL, assert_close, make_case  # noqa: E402


def _check(seq_lens: list[int], q_lens: list[int], heads: int, kv_heads: int,
           dtype: torch.dtype = torch.float32, window: int | None = None) -> None:
    case = make_case(seq_lens, q_lens, heads, kv_heads, 16, 16, dtype, seed=sum(seq_lens))
    slopes = ref.alibi_slopes(heads).to(case.query.device)
    args = (case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
            case.query_start_loc, case.scale, window)
    out = torch.full_like(case.query, float("nan"))
    got = paged_attention(*args, max_query_len=case.max_query_len, out=out, tuning=SMALL,
                          alibi_slopes=slopes)
    want = ref.paged_attention(*args, alibi_slopes=slopes)
    assert not torch.isnan(got).any()
    assert_close(got.float(), want.float(), dtype)
    plain = ref.paged_attention(*args)  # the biases matter at these lengths
    assert (plain.float() - want.float()).abs().max() > 1e-3


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)])
def test_decode_alibi(heads: int, kv_heads: int) -> None:
    # 6 heads: slopes of a non-power-of-two count; contexts over several 32-key partitions
    _check([5, 40, 77], [1, 1, 1], heads, kv_heads)


def test_prefill_alibi_with_cached_prefix_and_decode_rows() -> None:
    # a whole prompt, a chunk over a cached prefix, a decode row: masked and unmasked tiles
    _check([37, 50, 20], [37, 18, 1], 4, 2)


def test_alibi_bf16_and_window() -> None:
    _check([33, 9], [1, 1], 4, 4, dtype=torch.bfloat16)
    _check([45, 30], [45, 7], 4, 4, window=20)


def test_twin_alibi_equals_explicit_bias() -> None:
    g = torch.Generator().manual_seed(0)
    n, h, d = 9, 3, 8
    q, k, v = (torch.randn(n, h, d, generator=g) for _ in range(3))
    slopes = ref.alibi_slopes(h)
    got = ref.varlen_causal_attention(q, k, v, torch.tensor([0, n]), 0.3, alibi_slopes=slopes)
    pos = torch.arange(n)
    bias = slopes[:, None, None] * (pos[None, :] - pos[:, None]).float()
    scores = torch.einsum("qhd,khd->hqk", q, k) * 0.3 + bias
    scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    want = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_profiling_fallback_alibi_equals_twin() -> None:
    # The layer's no-cache path (memory profiling) builds the ALiBi bias for SDPA itself.
    from pagedserve.model_executor.layers.attention import dense_causal_attention

    g = torch.Generator().manual_seed(1)
    q = torch.randn(13, 4, 8, generator=g)
    k, v = torch.randn(13, 2, 8, generator=g), torch.randn(13, 2, 8, generator=g)
    qsl = torch.tensor([0, 6, 13], dtype=torch.int32)
    slopes = ref.alibi_slopes(4)
    for window in (None, 3):
        got = dense_causal_attention(q, k, v, qsl, 0.35, window, slopes)
        want = ref.varlen_causal_attention(q, k, v, qsl, 0.35, window, alibi_slopes=slopes)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
