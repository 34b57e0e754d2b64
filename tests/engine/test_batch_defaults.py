"""Batch limits chosen from the device (pagedserve/batch_defaults.py): the table, the clamps, and
that the CPU keeps 256 / 2048 whatever the usage context."""

from __future__ import annotations

import pytest
import torch

from pagedserve.batch_defaults import (
    DeviceInfo,
    GiB,
    default_batch_limits,
    device_class,
    parse_probe_output,
    probe_device,
    resolve_batch_limits,
)
from pagedserve.config import EngineArgs

H200 = DeviceInfo("cuda", "NVIDIA H200", 143771 << 20)
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 81559 << 20)
A100_80 = DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", 81920 << 20)
L4 = DeviceInfo("cuda", "NVIDIA L4", 23034 << 20)
CPU = DeviceInfo("cpu")


@pytest.mark.parametrize(("device", "context", "expected"), [
    (H200, "llm", (1024, 16384)),
    (H200, "server", (1024, 8192)),
    (H100, "llm", (1024, 16384)),
    (H100, "server", (1024, 8192)),
    (A100_80, "llm", (256, 8192)),  # >= 70 GiB but an A100: the small row (vLLM PR 17885)
    (A100_80, "server", (256, 2048)),
    (L4, "llm", (256, 8192)),
    (L4, "server", (256, 2048)),
    (DeviceInfo("cuda"), "llm", (256, 8192)),  # properties unknown: the small row
    (CPU, "llm", (256, 2048)),
    (CPU, "server", (256, 2048)),
])
def test_table(device: DeviceInfo, context: str, expected: tuple[int, int]) -> None:
    assert default_batch_limits(device, context) == expected


def test_device_class_threshold_is_70_gib() -> None:
    assert device_class(DeviceInfo("cuda", "X", 70 * GiB)) == "large-gpu"
    assert device_class(DeviceInfo("cuda", "X", 70 * GiB - 1)) == "gpu"
    assert device_class(CPU) == "cpu"


def test_given_values_are_kept_and_the_rest_chosen() -> None:
    both = resolve_batch_limits(H200, "llm", 8, 512, True, 4096)
    assert (both.max_num_seqs, both.max_num_batched_tokens, both.source) == (8, 512, "given")
    seqs_only = resolve_batch_limits(H200, "server", 64, None, True, 4096)
    assert (seqs_only.max_num_seqs, seqs_only.max_num_batched_tokens) == (64, 8192)
    assert "max_num_batched_tokens" in seqs_only.source and "max_num_seqs" not in seqs_only.source
    assert "large-gpu" in seqs_only.source and "'server'" in seqs_only.source


def test_gpu_default_seqs_are_clamped_to_the_token_budget_but_cpu_seqs_are_not() -> None:
    assert resolve_batch_limits(H200, "llm", None, 512, True, 4096).max_num_seqs == 512
    assert resolve_batch_limits(L4, "llm", None, 64, True, 4096).max_num_seqs == 64
    assert resolve_batch_limits(CPU, "llm", None, 64, True, 4096).max_num_seqs == 256


def test_without_chunked_prefill_the_budget_covers_max_model_len() -> None:
    assert resolve_batch_limits(CPU, "llm", None, None, False, 4096).max_num_batched_tokens == 4096
    assert resolve_batch_limits(CPU, "llm", None, None, False, 1024).max_num_batched_tokens == 2048
    assert resolve_batch_limits(H200, "llm", None, None, False, 32768).max_num_batched_tokens == 32768
    assert resolve_batch_limits(H200, "llm", None, None, False, 4096).max_num_batched_tokens == 16384


def test_unknown_usage_context_is_refused() -> None:
    with pytest.raises(ValueError, match="usage_context"):
        default_batch_limits(H200, "batch")


def test_probe_output_parsing() -> None:
    assert parse_probe_output("150754820096\nNVIDIA H200\n") == DeviceInfo("cuda", "NVIDIA H200", 150754820096)
    assert parse_probe_output("garbage") == DeviceInfo("cuda")
    assert probe_device("cpu") == CPU


def test_cpu_engine_config_keeps_256_and_2048(tiny_checkpoints) -> None:
    for context in ("llm", "server"):
        config = EngineArgs(model=tiny_checkpoints["llama"], device="cpu", max_model_len=64,
                            usage_context=context).create_engine_config()
        sched = config.scheduler_config
        assert (sched.max_num_seqs, sched.max_num_batched_tokens) == (256, 2048)
        assert "cpu" in sched.limits_source
    with pytest.raises(ValueError, match="usage_context"):
        EngineArgs(model=tiny_checkpoints["llama"], device="cpu", usage_context="x").create_engine_config()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_reads_the_gpu_the_engine_sees() -> None:
    props = torch.cuda.get_device_properties(0)
    assert probe_device("cuda") == DeviceInfo("cuda", props.name, int(props.total_memory))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU fallback")
def test_probe_without_a_gpu_falls_back_to_the_small_row(caplog: pytest.LogCaptureFixture) -> None:
    info = probe_device("cuda")
    assert info == DeviceInfo("cuda") and device_class(info) == "gpu"
    assert "could not read the GPU's properties" in caplog.text
