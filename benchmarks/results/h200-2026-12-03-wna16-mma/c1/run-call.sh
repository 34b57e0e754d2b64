#!/usr/bin/env bash
# Session 15, call 1: issue 11, tinygemm (torch._weight_int4pack_mm) beside our int4 kernels and bf16 at 8B shapes.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/c1; mkdir -p "$R"; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R"/nvidia-smi.txt
timeout 540 python3 -m benchmarks.wna16_bench --t 1 2 4 8 16 32 64 128 256 --json "$R"/wna16_tinygemm.json 2>&1 | tee "$R"/wna16_tinygemm.log | tail -50
echo "total $(( $(date +%s) - start )) s"
