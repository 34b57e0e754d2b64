#!/usr/bin/env bash
# Session 10, last call: is the one-process client honest on the device host (stub server), then issue 15's
# overload run with the client spread over 4 processes (both servers).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
R=$OUT/p6; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/nvidia-smi.txt
nproc > $R/nproc.txt
(python3 -m benchmarks.build_model /tmp/llama3-8b-random 2>&1 | tail -1) &
timeout 60 python3 -m benchmarks.client_check --rate 81 --num-requests 400 --max-tokens 256 --client-procs 1 4 \
    --json $R/client_check.json 2>&1 | tail -6 | tee $R/client_check.log
wait
timeout 240 python3 -m benchmarks.slo_serving --model /tmp/llama3-8b-random --out $R/slo --slo-tpot-ms 30 --slo-ttft-ms 2000 \
    --num-requests 1200 --sustainable-rate 54 --overload 1.5 --loads overload --warmup-requests 150 --client-procs 4 \
    --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tee $R/slo.log | tail -7
