"""The serving benchmarks' client against the stream stub: every request is recorded once,
whether the client runs in one process or is spread over several, and no token is seen before
the stub sent it (the stub's TTFT is a lower bound of the measured one). No timing thresholds:
how far a busy client drifts is what benchmarks/client_check.py measures, not a test."""

from __future__ import annotations

import pytest

from benchmarks.client_check import check


@pytest.mark.parametrize("client_procs", [1, 2])
def test_client_records_every_request_and_token(client_procs: int) -> None:
    row = check(rate=20.0, num_requests=12, tpot_ms=5.0, ttft_ms=15.0, client_procs=client_procs, max_tokens=6)
    assert row["client_procs"] == client_procs
    assert row["requests"] == 12 and row["failed"] == 0 and row["shed_429"] == 0
    assert row["achieved_rps"] * row["elapsed_s"] == pytest.approx(12)
    assert row["ttft_p50_ms"] >= 15.0
    assert row["sent_tpot_p50_ms"] > 0  # the stub logged what it sent
