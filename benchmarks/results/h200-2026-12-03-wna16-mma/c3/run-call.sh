#!/usr/bin/env bash
# Session 15, call 3: issue 11, launch sweep of the tensor-core int4 kernel (scale in the weight or on the dot, 64 or 128 rows, splits, stages).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
R=$OUT/c3; mkdir -p "$R"; start=$(date +%s)
timeout 420 python3 -m benchmarks.wna16_bench --mma-sweep --t 1 16 64 256 --budget-s 380 --json "$R"/wna16_mma_sweep2.json 2>&1 | tee "$R"/wna16_mma_sweep2.log | grep "^mma\|FAIL\|Error\|error" | cut -c1-400 | tail -30
echo "total $(( $(date +%s) - start )) s"
