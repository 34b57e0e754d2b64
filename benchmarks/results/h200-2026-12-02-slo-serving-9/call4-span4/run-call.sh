#!/usr/bin/env bash
# Session 12, call 4: issue 15 at 80 req/s, the default controller (setpoint 0.7, 3886195) beside
# span=4 (the TPOT signal from 4-step means instead of 16: closer to a short request's TPOT).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/c4; mkdir -p "$R"; start=$(date +%s)
python3 -m benchmarks.build_model /tmp/llama3-8b-random 2>&1 | tail -1
left=$(( 285 - ($(date +%s) - start) ))
timeout $left python3 -m benchmarks.slo_serving --model /tmp/llama3-8b-random --out "$R" --slo-tpot-ms 30 --slo-ttft-ms 2000 \
    --num-requests 2400 --probe-requests 400 --seconds 25 --sustainable-rate 40 --overload 2 --light 0.3 --client-procs 4 \
    --loads overload --warmup-requests 100 --skip-plain --slo-variant span=4 \
    --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tee "$R"/slo.log | tail -6
echo "total $(( $(date +%s) - start )) s"
