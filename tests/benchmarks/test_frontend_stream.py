"""benchmarks/frontend_stream.py runs the real server in front of its paced stand-in core and
counts every streamed token (a tiny run: it checks the harness, it measures nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_every_stream_delivers_its_tokens(tmp_path: Path) -> None:
    out = tmp_path / "fe.json"
    subprocess.run([sys.executable, "-m", "benchmarks.frontend_stream", "--streams", "4", "--tokens", "5",
                    "--step-ms", "10", "--json", str(out)], check=True, timeout=300)  # fmt: skip
    [row] = json.loads(out.read_text())["rows"]
    assert row["streams"] == 4 and row["delivered_tokens"] == 20
    assert row["tokens_per_event"] >= 1.0 and row["server_cpu_us_per_token"] > 0
