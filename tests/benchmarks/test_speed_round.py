"""benchmarks/speed_round.py: each row runs in its own worker process on the tree it is given and
reports exact token counts; kernel names fall into the classes the gap analysis sums."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.speed_round import ROWS, kernel_class, summary

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_classes() -> None:
    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "gemm"
    assert kernel_class("_mma_kernel") == "gemm"
    assert kernel_class("_prefill_kernel") == "attention"
    assert kernel_class("_decode_partition_kernel") == "attention"
    assert kernel_class("void at::native::sbtopk::gatherTopK<float>") == "sampler"
    assert kernel_class("_rms_norm_kernel") == "norm/rotary/act"
    assert kernel_class("something_else") == "other"


def test_summary_compares_realistic_sampling_with_the_plain_row_of_its_tree() -> None:
    results = [
        {"row": "defaults", "tree": "new", "workload": "sharegpt", "output_tokens_per_s": 1000.0},
        {"row": "realistic-sampling", "tree": "new", "workload": "realistic-sampling", "output_tokens_per_s": 900.0},
        {"row": "batch1", "tree": "old", "workload": "batch1", "tokens_per_s": 50.0, "fraction_of_floor": 0.5},
    ]
    lines = summary(results)
    assert lines[1]["vs_plain"] == 0.9
    assert lines[2]["output_tok_s"] == 50.0 and lines[2]["vs_floor_or_roofline"] == 0.5


def test_tiny_rows_run_in_workers(tmp_path: Path) -> None:
    out = tmp_path / "round.json"
    subprocess.run([sys.executable, "-m", "benchmarks.speed_round", "--tiny", "--tree", f"new={ROOT}",
                    "--rows", "defaults,batch1", "--profile", "new", "--json", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    results = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"defaults", "batch1"}
    mix = results["defaults"]
    assert "error" not in mix, mix
    assert mix["output_tokens"] == mix["expected_output_tokens"] > 0
    assert mix["requests"] == round(ROWS["defaults"].requests * 0.032)
    assert 0 < mix["roofline_fraction"] and mix["profile_steps"] >= 1
    one = results["batch1"]
    assert one["tokens_per_s"] > 0 and one["floor_tokens_per_s"] > one["tokens_per_s"]
