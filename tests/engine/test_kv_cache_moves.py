"""Block moves between KV caches (swap out, swap in, fork copy) land every element."""

from __future__ import annotations

import pytest
import torch

from pagedserve.worker.kv_cache import KVCacheSpec, allocate_kv_cache, move_blocks


def _random_cache(spec: KVCacheSpec, num_blocks: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    caches = allocate_kv_cache(spec, num_blocks, torch.device(device))
    for k, v in caches:
        k.normal_()
        v.normal_()
    return caches


def _check(src, dst, mapping) -> None:  # type: ignore[no-untyped-def]
    for (sk, sv), (dk, dv) in zip(src, dst):
        for s, d in ((sk, dk), (sv, dv)):
            for i, j in mapping:
                torch.testing.assert_close(d[j].cpu(), s[i].cpu(), rtol=0, atol=0)


def test_moves_between_cpu_caches() -> None:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    src = _random_cache(spec, 10, "cpu")
    dst = _random_cache(spec, 6, "cpu")
    mapping = [(7, 0), (2, 5), (9, 3)]
    move_blocks(src, dst, mapping)
    _check(src, dst, mapping)
    move_blocks(src, src, [(0, 1)])  # a copy within one cache (fork)
    _check(src, src, [(0, 1)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_swap_out_and_in_on_gpu_with_the_stream_busy() -> None:
    spec = KVCacheSpec(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.float16)
    gpu = _random_cache(spec, 2048, "cuda")
    cpu = allocate_kv_cache(spec, 1024, torch.device("cpu"), pin_memory=True)
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # queue work so that an unsynchronised copy would be read too early
        busy = busy @ busy / 64
    out_map = [(3 * i, i) for i in range(512)]
    move_blocks(gpu, cpu, out_map)
    _check(gpu, cpu, out_map)
    in_map = [(i, 2047 - i) for i in range(512)]
    move_blocks(cpu, gpu, in_map)
    torch.cuda.synchronize()
    _check(cpu, gpu, in_map)
