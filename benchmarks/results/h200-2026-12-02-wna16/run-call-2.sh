#!/usr/bin/env bash
# Session 9, call 2: issue 15 (both servers at 81 and 16.2 req/s, slack-banking controller), the FP8
# GPU test failure's message, int4 kernels with the sweep-derived tables.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=/tmp/m2; rm -rf $R; mkdir -p $R; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/nvidia-smi.txt
python3 -m benchmarks.build_model /tmp/llama3-8b-random 2>&1 | tail -1
timeout 400 python3 -m benchmarks.slo_serving --model /tmp/llama3-8b-random --out $R/slo --slo-tpot-ms 30 --slo-ttft-ms 2000 \
    --num-requests 1200 --light-requests 300 --sustainable-rate 54 --overload 1.5 --light 0.3 --warmup-requests 300 \
    --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tee $R/slo.log | tail -9
tar czf $OUT/m2.tgz -C $R .
timeout 40 python3 -m pytest -x -q -m gpu tests/quant/test_fp8.py -k scaled_mm_matches > $R/fp8-test.log 2>&1
grep -E "^E |Error|error" $R/fp8-test.log | head -20
left=$(( 560 - ($(date +%s) - start) ))
timeout $left python3 -m benchmarks.wna16_bench --t 1 4 8 16 --json $R/wna16_bench.json > $R/wna16_bench.log 2>&1
grep -E "^(qkv|o|gate_up|down) T=|FAIL" $R/wna16_bench.log
tar czf $OUT/m2.tgz -C $R .
