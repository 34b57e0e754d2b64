"""`pagedserve tune` on the CPU with the tiny model: a few trials on a small workload; the file it
writes is accepted by `serve --config`, and its choice measured at least as well as the defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pagedserve.entrypoints.cli import main as cli_main
from pagedserve.entrypoints.config_file import expand_config_file
from pagedserve.entrypoints.openai.cli_args import engine_args_from, make_arg_parser, parse_args


def test_tune_writes_a_config_serve_accepts(tiny_checkpoints: Any, tmp_path: Path) -> None:
    out, report_path = tmp_path / "tuned.yaml", tmp_path / "tune.json"
    workload = tmp_path / "work.jsonl"
    workload.write_text("\n".join(json.dumps({"prompt": f"the model number {i} runs", "output_len": 6 + i % 5})
                                  for i in range(10)) + "\n")  # fmt: skip
    code = cli_main([
        "tune", "--model", tiny_checkpoints["llama"], "--workload", str(workload), "--request-rate", "20",
        "--trials", "3", "--patience", "3", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "500",
        "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-bytes", str(8 << 20),
        "--max-num-seqs-limit", "16", "--no-progress", "-o", str(out), "--json", str(report_path),
    ])  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    measured = [t for t in report["trials"] if "goodput_rps" in t]
    assert report["defaults"]["number"] == 0 and report["defaults"]["params"]["max_num_seqs"] == 256
    assert report["best"]["goodput_rps"] == max(t["goodput_rps"] for t in measured)
    assert report["best"]["goodput_rps"] >= report["defaults"]["goodput_rps"]
    flags = yaml.safe_load(out.read_text())
    best = report["best"]["params"]
    assert flags["max-num-seqs"] == best["max_num_seqs"] and flags["block-size"] == best["block_size"]
    assert flags["enable-chunked-prefill"] is best["enable_chunked_prefill"]
    assert flags["slo-tpot-ms"] == 500
    # serve --config reads it: the same engine settings, and the command line still wins
    args = parse_args(["--config", str(out), "--port", "8123"])
    engine_args = engine_args_from(args)
    assert engine_args.max_num_seqs == best["max_num_seqs"]
    assert engine_args.async_scheduling is best["async_scheduling"]
    assert engine_args.model == tiny_checkpoints["llama"] and args.port == 8123
    config = engine_args.create_engine_config()  # validated as the server would at start
    assert config.scheduler_config.slo is not None
    assert config.cache_config.block_size == best["block_size"]
    assert engine_args_from(parse_args(["--config", str(out), "--max-num-seqs", "3"])).max_num_seqs == 3


def test_config_file_flag_forms(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "max-num-seqs": 64, "max_num_batched_tokens": 1024, "enable-chunked-prefill": False,
        "enable-prefix-caching": True, "async-scheduling": True, "api-key": ["a", "b"],
        "served-model-name": ["x", "y"], "override-generation-config": {"temperature": 0.5},
        "slo-ttft-ms": "interactive=200,batch=2000",
    }))  # fmt: skip
    args = parse_args(["--config", str(path), "--no-enable-prefix-caching", "--api-key", "c"])
    assert (args.max_num_seqs, args.max_num_batched_tokens) == (64, 1024)
    assert args.enable_chunked_prefill is False and args.async_scheduling is True
    assert args.enable_prefix_caching is False  # the command line wins, without a conflict
    assert args.api_key == ["c"] and args.served_model_name == ["x", "y"]
    assert args.override_generation_config == {"temperature": 0.5}
    assert args.slo_ttft_ms == {"interactive": 200.0, "batch": 2000.0}
    parser = make_arg_parser()
    path.write_text("max-num-seq: 3\n")
    try:
        expand_config_file(parser, ["--config", str(path)])
        raise AssertionError("an unknown key was accepted")
    except SystemExit as e:
        assert "unknown flag 'max-num-seq'" in str(e)
