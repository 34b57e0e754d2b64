"""Host resources of the engine: CPU KV cache sizing, available memory, thread counts.

Exact numbers throughout: the demo model's KV block is 64 KiB (4 layers x 2 (K, V) x 16 tokens x
4 KV heads x 32 dims x 4 bytes), its weights 12,657,664 bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve.worker.cpu_resources import (
    MiB,
    check_host_pools_fit,
    choose_cpu_threads,
    configure_engine_threads,
    cpu_kv_cache_blocks,
    mem_available_bytes,
    module_bytes,
    usable_cores,
)

GiB = 1 << 30
DEMO_BLOCK = 64 * 1024
DEMO_WEIGHTS = 12_657_664


def test_demo_model_is_held_to_the_model_cap_floor() -> None:
    # needed: 256 seqs x 256 blocks = 65536 blocks (4 GiB); model cap: max(4 x 12.1 MiB, 256 MiB)
    # = 4096 blocks; memory cap: 11 GiB / 64 KiB = 180224 blocks.
    sizing = cpu_kv_cache_blocks(DEMO_BLOCK, 16, 256, 4096, 22 * GiB, DEMO_WEIGHTS)
    assert (sizing.num_blocks, sizing.limit) == (4096, "model")
    assert "12.1 MiB of weights" in sizing.describe()


def test_never_more_than_max_num_seqs_full_sequences() -> None:
    # 4 seqs x ceil(100 / 16) = 4 x 7 = 28 blocks, far below both caps
    sizing = cpu_kv_cache_blocks(DEMO_BLOCK, 16, 4, 100, 22 * GiB, DEMO_WEIGHTS)
    assert (sizing.num_blocks, sizing.limit) == (28, "needed")


def test_equal_bounds_report_needed() -> None:
    # 16 seqs x 256 blocks = 4096 = the model cap floor: the pool holds exactly what can be used
    sizing = cpu_kv_cache_blocks(DEMO_BLOCK, 16, 16, 4096, 22 * GiB, DEMO_WEIGHTS)
    assert (sizing.num_blocks, sizing.limit) == (4096, "needed")


def test_available_memory_caps_the_pool() -> None:
    # half of 100 MiB = 50 MiB = 800 blocks of 64 KiB
    sizing = cpu_kv_cache_blocks(DEMO_BLOCK, 16, 256, 4096, 100 * MiB, DEMO_WEIGHTS)
    assert (sizing.num_blocks, sizing.limit) == (800, "memory")
    assert "50%" in sizing.describe() and "100 MiB" in sizing.describe()


def test_model_cap_scales_with_the_weights() -> None:
    # 1 GiB of weights, 1 MiB blocks: 4 GiB / 1 MiB = 4096 blocks; unknown memory leaves its cap out
    sizing = cpu_kv_cache_blocks(MiB, 16, 256, 4096, None, GiB)
    assert (sizing.num_blocks, sizing.limit) == (4096, "model")


def test_model_cap_holds_at_least_one_full_length_sequence() -> None:
    # 1 MiB blocks: the 256 MiB floor is 256 blocks, but one 8192-token sequence needs 512
    sizing = cpu_kv_cache_blocks(MiB, 16, 256, 8192, 64 * GiB, 1000)
    assert (sizing.num_blocks, sizing.limit) == (512, "model")


def test_short_memory_wins_over_the_one_sequence_floor() -> None:
    # 50 MiB / 1 MiB = 50 blocks < 512: EngineCore then refuses to start with the reason
    sizing = cpu_kv_cache_blocks(MiB, 16, 256, 8192, 100 * MiB, 1000)
    assert (sizing.num_blocks, sizing.limit) == (50, "memory")


def _fake_host(tmp_path: Path, meminfo_kib: int | None, cgroup: tuple[str, int, int] | None) -> tuple[Path, Path]:
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    cg.mkdir()
    if meminfo_kib is not None:
        (proc / "meminfo").write_text(
            f"MemTotal:       99999999 kB\nMemFree:          123 kB\nMemAvailable:   {meminfo_kib} kB\n"
        )
    if cgroup is not None:
        limit, current, inactive = cgroup
        (cg / "memory.max").write_text(limit + "\n")
        (cg / "memory.current").write_text(f"{current}\n")
        (cg / "memory.stat").write_text(f"anon 5\ninactive_file {inactive}\nactive_file 7\n")
    return proc, cg


def test_mem_available_reads_meminfo(tmp_path: Path) -> None:
    proc, cg = _fake_host(tmp_path, 1000, ("max", 1, 0))
    assert mem_available_bytes(proc, cg) == 1000 * 1024


def test_mem_available_is_lowered_to_the_cgroup_room(tmp_path: Path) -> None:
    # limit 600000 - current 500000 + reclaimable page cache 100000 = 200000 < 1024000
    proc, cg = _fake_host(tmp_path, 1000, ("600000", 500000, 100000))
    assert mem_available_bytes(proc, cg) == 200000


def test_mem_available_unknown_host(tmp_path: Path) -> None:
    proc, cg = _fake_host(tmp_path, None, None)
    assert mem_available_bytes(proc, cg) is None


def test_mem_available_on_this_host_is_positive() -> None:
    available = mem_available_bytes()
    assert available is not None and available > 0


def test_host_pools_that_do_not_fit_are_refused() -> None:
    check_host_pools_fit(100 * MiB, 100 * MiB)
    check_host_pools_fit(100 * MiB, None)
    with pytest.raises(ValueError, match="need 101 MiB but only 100 MiB"):
        check_host_pools_fit(101 * MiB, 100 * MiB)


def test_module_bytes_counts_tied_weights_once() -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    model.register_buffer("inv_freq", torch.zeros(3, dtype=torch.float64))
    assert module_bytes(model) == 10 * 4 * 4 + 3 * 8


# ---------------------------------------------------------------------------- threads


def test_threads_default_leaves_one_core_to_the_front() -> None:
    assert choose_cpu_threads(None, {}, 16)[0] == 15
    assert choose_cpu_threads(None, {}, 2)[0] == 1
    assert choose_cpu_threads(None, {}, 1)[0] == 1


def test_threads_flag_wins_then_omp_num_threads() -> None:
    assert choose_cpu_threads(3, {"OMP_NUM_THREADS": "5"}, 16) == (3, "--cpu-threads")
    assert choose_cpu_threads(None, {"OMP_NUM_THREADS": "5"}, 16) == (5, "OMP_NUM_THREADS")
    assert choose_cpu_threads(None, {"OMP_NUM_THREADS": "zero"}, 16)[0] == 15
    assert choose_cpu_threads(None, {"OMP_NUM_THREADS": "0"}, 16)[0] == 15


def test_usable_cores_within_the_affinity() -> None:
    import os

    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_configure_engine_threads_sets_torch() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_engine_threads("cuda", None) is None  # a GPU engine keeps torch's default
        assert torch.get_num_threads() == before
        torch.set_num_threads(2)
        assert configure_engine_threads("cpu", 1) == 1
        assert torch.get_num_threads() == 1
        assert configure_engine_threads("cuda", 2) == 2  # the flag applies on a GPU too
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_flag_reaches_the_engine_args() -> None:
    from pagedserve.entrypoints.openai.cli_args import engine_args_from, parse_args

    assert engine_args_from(parse_args(["--model", "m", "--cpu-threads", "3"])).cpu_threads == 3
    assert engine_args_from(parse_args(["--model", "m"])).cpu_threads is None
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "m", "--cpu-threads", "0"])
    assert e.value.code == 2
