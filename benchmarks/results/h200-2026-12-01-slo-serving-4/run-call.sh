#!/usr/bin/env bash
# Session 8, call 3: issue 15 at overload: 1.5 x the 54 req/s that call 2 measured the server without
# objectives to sustain (P99 TPOT 26.1 ms, P99 TTFT 1,123 ms over 1,200 requests), both servers.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PAGEDSERVE_COMMIT=a68b0dd PYTHONUNBUFFERED=1
R=/tmp/r3; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/nvidia-smi.txt
python3 -m benchmarks.build_model /tmp/llama3-8b-random 2>&1 | tail -1
timeout 430 python3 -m benchmarks.slo_serving --model /tmp/llama3-8b-random --out $R/slo --slo-tpot-ms 30 --slo-ttft-ms 2000 \
    --num-requests 1200 --sustainable-rate 54 --overload 1.5 --loads overload --warmup-requests 300 \
    --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tee $R/slo-overload.log | tail -12
tar czf $OUT/call3.tgz -C $R .
