#!/usr/bin/env bash
# Session 11, call 3: issue 15 at 80 req/s (call 2's plain server met the objectives at 60):
# the plain and the SLO-aware server, 25 s of arrivals each, four client processes.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/c3; mkdir -p "$R"; start=$(date +%s)
python3 -m benchmarks.build_model /tmp/llama3-8b-random 2>&1 | tail -1
left=$(( 318 - ($(date +%s) - start) ))
timeout $left python3 -m benchmarks.slo_serving --model /tmp/llama3-8b-random --out "$R" --slo-tpot-ms 30 --slo-ttft-ms 2000 \
    --num-requests 2400 --probe-requests 400 --seconds 25 --start-rate 32 --sustainable-rate 53.33 --client-procs 4 \
    --loads overload --warmup-requests 100 \
    --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tee "$R"/slo.log | tail -8
echo "total $(( $(date +%s) - start )) s"
