"""Triton row argmax vs torch.argmax (its twin): ties, -inf rows, ragged chunk tails."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedserve.kernels import reference as ref  # noqa: E402
from pagedserve.kernels.triton.argmax import argmax_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_cols", [1, 15, 64, 100, 257])
def test_argmax_matches_torch(dtype: torch.dtype, num_cols: int) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(num_cols)
    x = torch.randn((5, num_cols), generator=g, device=DEVICE).to(dtype)
    # ties across chunks (chunk 16): the same max at several columns, first one must win
    if num_cols > 40:
        x[1, 3] = x[1, 35] = x[1].max() + 1
        x[2, 40] = x[2, 20] = x[2].max() + 1
    x[3] = float("-inf")  # all -inf -> 0, as torch
    if num_cols > 1:
        x[4, -1] = x[4].max() + 1  # max in the ragged last chunk
    got = argmax_rows(x, chunk=16)
    assert got.dtype == torch.int64
    assert got.tolist() == ref.argmax_rows(x).tolist()


def test_argmax_default_chunk_and_out_buffer() -> None:
    x = torch.randn((3, 5000), device=DEVICE)
    out = torch.full((3,), -1, dtype=torch.int64, device=DEVICE)
    assert argmax_rows(x, out=out) is out
    assert out.tolist() == x.argmax(dim=-1).tolist()


def test_argmax_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        argmax_rows(torch.randn(4, 3, device=DEVICE).t())
    with pytest.raises(ValueError, match="empty"):
        argmax_rows(torch.empty((2, 0), device=DEVICE))
    with pytest.raises(ValueError, match="int64"):
        argmax_rows(torch.randn(2, 8, device=DEVICE), out=torch.empty(2, dtype=torch.int32, device=DEVICE))
