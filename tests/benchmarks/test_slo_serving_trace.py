"""benchmarks/slo_serving.py's /metrics trace: the series it samples are read from a page as the
server renders it (labelled samples of one name summed, other names and comments skipped)."""

from __future__ import annotations

from benchmarks.slo_serving import parse_series

PAGE = """# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 12.0
vllm:num_requests_waiting{model_name="m"} 3.0
pagedserve:slo_max_num_seqs{model_name="m"} 64.0
pagedserve:slo_max_num_batched_tokens{model_name="m"} 1024.0
pagedserve:slo_rejected_requests_total{model_name="m",priority_class="interactive"} 5.0
pagedserve:slo_rejected_requests_total{model_name="m",priority_class="batch"} 2.0
pagedserve:slo_rejected_requests_created{model_name="m",priority_class="batch"} 1.7e9
vllm:num_requests_running_other{model_name="m"} 99.0
"""


def test_parse_series_reads_the_traced_series() -> None:
    assert parse_series(PAGE) == {"running": 12.0, "waiting": 3.0, "max_num_seqs": 64.0, "token_budget": 1024.0,
                                  "rejected": 7.0}  # fmt: skip
    assert parse_series("") == {}
