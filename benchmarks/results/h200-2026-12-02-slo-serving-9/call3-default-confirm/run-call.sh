#!/usr/bin/env bash
# Session 12, call 3: (1) issue 15: the SLO-aware server at its new default (setpoint 0.7, 3886195)
# at light load (12 req/s) and at 80 req/s (the plain server: call 2); (2) issue 13: a step with
# prefill beside N decodes against the decodes alone (graphs, no mixed-step graphs, eager).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/c3; mkdir -p "$R/mixed"; start=$(date +%s)
python3 -m benchmarks.build_model /tmp/llama3-8b-random 2>&1 | tail -1
timeout 230 python3 -m benchmarks.slo_serving --model /tmp/llama3-8b-random --out "$R" --slo-tpot-ms 30 --slo-ttft-ms 2000 \
    --num-requests 2400 --probe-requests 400 --seconds 25 --sustainable-rate 40 --overload 2 --light 0.3 --client-procs 4 \
    --loads light overload --light-requests 200 --warmup-requests 100 --skip-plain \
    --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tee "$R"/slo.log | tail -6
echo "slo done at $(( $(date +%s) - start )) s"
left=$(( 585 - ($(date +%s) - start) ))
OUT="$R/mixed" timeout $left bash benchmarks/gpu_suite.sh mixed 2>&1 | tee "$R"/mixed/mixed.log | tail -40
echo "total $(( $(date +%s) - start )) s"
