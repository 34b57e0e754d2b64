#!/usr/bin/env bash
# Session 15, call 2: issue 11, the tensor-core int4 kernel (wna16_mma) beside bf16, tinygemm and our other int4 kernels; its launch sweep.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/c2; mkdir -p "$R"; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R"/nvidia-smi.txt
timeout 250 python3 -m benchmarks.wna16_bench --t 1 2 4 8 16 32 64 128 256 1024 --json "$R"/wna16_mma.json 2>&1 | tee "$R"/wna16_mma.log | grep -v "^ " | tail -48
left=$(( 560 - ($(date +%s) - start) ))
timeout $left python3 -m benchmarks.wna16_bench --mma-sweep --t 1 4 16 64 256 --budget-s $(( left - 40 )) --json "$R"/wna16_mma_sweep.json 2>&1 | tee "$R"/wna16_mma_sweep.log | grep "^mma\|FAIL\|Error\|error" | tail -30
echo "total $(( $(date +%s) - start )) s"
