#!/usr/bin/env bash
# Session 15, call 5: issue 11, the gated launch fix: the projections at 32 / 64 tokens, the 8B gptq4 model again.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
R=$OUT/c5; mkdir -p "$R"; start=$(date +%s)
(python3 -m benchmarks.build_model /tmp/llama3-8b-random > "$R"/build.log 2>&1; echo built >> "$R"/build.log) &
timeout 70 python3 -m benchmarks.wna16_bench --t 32 64 --json "$R"/wna16_bench.json 2>&1 | tee "$R"/wna16_bench.log | grep -v "^ " | grep -v "^[a-z_]* *|" | tail -10
wait
timeout 150 python3 -m benchmarks.quant_gpu --model /tmp/llama3-8b-random --parts 8b --formats gptq4 \
    --json "$R"/quant-8b.json 2>&1 | grep -vE "Loading|Converting|it/s]" | tee "$R"/quant-8b.log | tail -6
echo "total $(( $(date +%s) - start )) s"
