#!/usr/bin/env bash
# Session 15, call 4: issue 11 after the tensor-core int4 kernel: its GPU tests, the per-projection bench, the 8B model per format.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
R=$OUT/c4; mkdir -p "$R"; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R"/nvidia-smi.txt
(python3 -m benchmarks.build_model /tmp/llama3-8b-random > "$R"/build.log 2>&1; echo built >> "$R"/build.log) &
timeout 75 python3 -m pytest -q -m gpu tests/kernels/test_wna16_mma.py -p no:cacheprovider 2>&1 | tee "$R"/gpu-tests.log | tail -3
timeout 110 python3 -m benchmarks.wna16_bench --t 1 16 64 256 1024 --json "$R"/wna16_bench.json 2>&1 | tee "$R"/wna16_bench.log | grep -v "^ " | grep -v "^[a-z_]* *|" | tail -24
wait
left=$(( 545 - ($(date +%s) - start) ))
timeout $left python3 -m benchmarks.quant_gpu --model /tmp/llama3-8b-random --parts 8b --formats bf16,gptq4,awq4 \
    --json "$R"/quant-8b.json 2>&1 | grep -vE "Loading|Converting|it/s]" | tee "$R"/quant-8b.log | tail -30
echo "total $(( $(date +%s) - start )) s"
