#!/usr/bin/env bash
# Session 9, call 1 (issue 11): FP8 decode GEMV GPU tests; int4 kernels vs bf16 beside floors; launch sweep.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=/tmp/m1; rm -rf $R; mkdir -p $R; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/nvidia-smi.txt
timeout 110 python3 -m pytest -q -m gpu tests/kernels/test_gemv_fp8.py tests/quant/test_fp8.py 2>&1 | tail -6 | tee $R/gpu-tests.log
timeout 140 python3 -m benchmarks.wna16_bench --t 1 4 8 16 64 --json $R/wna16_bench.json 2>&1 | tail -40 > $R/wna16_bench.log
cat $R/wna16_bench.log | tail -30
left=$(( 540 - ($(date +%s) - start) ))
timeout $left python3 -m benchmarks.wna16_bench --sweep --t 1 16 4 8 --budget-s $((left - 40)) --json $R/wna16_sweep.json > $R/wna16_sweep.log 2>&1
grep -v "^|" $R/wna16_sweep.log | tail -30
tar czf $OUT/m1.tgz -C $R .
