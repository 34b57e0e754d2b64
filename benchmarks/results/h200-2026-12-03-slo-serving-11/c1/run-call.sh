#!/usr/bin/env bash
# Session 14, call 1: issue 15 at 80 req/s after the prefill-wait admission and the light-load breach rule (2df8e8d):
# the default controller three times on one server, beside the plain server once (same call as session 13).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/c1; mkdir -p "$R"; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R"/nvidia-smi.txt
python3 -m benchmarks.build_model /tmp/llama3-8b-random 2>&1 | tail -1
left=$(( 575 - ($(date +%s) - start) ))
timeout $left python3 -m benchmarks.slo_serving --model /tmp/llama3-8b-random --out "$R" --slo-tpot-ms 30 --slo-ttft-ms 2000 \
    --num-requests 2400 --probe-requests 400 --seconds 25 --sustainable-rate 40 --overload 2 --light 0.3 --client-procs 4 \
    --loads light overload --light-requests 200 --warmup-requests 100 --overload-repeats 3 \
    --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tee "$R"/slo.log | tail -12
echo "total $(( $(date +%s) - start )) s"
