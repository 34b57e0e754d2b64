#!/usr/bin/env bash
# Session 11, call 1: GPU tests of the capture refactor, then issue 15 with four client processes:
# the sustainable-rate search and the overload runs of both servers.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/c1; mkdir -p $R; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > $R/nvidia-smi.txt
nproc > $R/nproc.txt
python3 -m benchmarks.build_model /tmp/llama3-8b-random 2>&1 | tail -1
timeout 200 python3 -m pytest -q -m gpu tests/engine/test_mixed_graphs.py tests/engine/test_cuda_graph_decode.py \
    tests/engine/test_sampler_state.py 2>&1 | tail -6 | tee $R/gpu-tests.log
left=$(( 590 - ($(date +%s) - start) ))
echo "left for slo: $left s"
timeout $left python3 -m benchmarks.slo_serving --model /tmp/llama3-8b-random --out $R/slo --slo-tpot-ms 30 --slo-ttft-ms 2000 \
    --num-requests 1200 --probe-requests 500 --start-rate 32 --bisect 2 --client-procs 4 --loads overload \
    --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tee $R/slo.log | tail -12
