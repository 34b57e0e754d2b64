#!/usr/bin/env bash
# Session 10, call 4: mixed-step graphs after the offsets fix: GPU tests, the surcharge, issue 15's servers at 81 / 16.2 req/s.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
R=/tmp/p4; rm -rf $R; mkdir -p $R; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > $R/nvidia-smi.txt
python3 -m benchmarks.build_model /tmp/llama3-8b-random 2>&1 | tail -1
( export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  timeout 170 python3 -m pytest -q -m gpu tests/engine/test_mixed_graphs.py tests/engine/test_cuda_graph_decode.py \
    tests/engine/test_sampler_state.py 2>&1 | tail -6 | tee $R/gpu-tests.log )
grep -q " passed" $R/gpu-tests.log && ! grep -q "failed\|error" $R/gpu-tests.log || { tar czf $OUT/p4.tgz -C $R .; exit 3; }
left=$(( 575 - ($(date +%s) - start) ))
timeout $left python3 -m benchmarks.slo_serving --model /tmp/llama3-8b-random --out $R/slo --slo-tpot-ms 30 --slo-ttft-ms 2000 \
    --num-requests 1200 --light-requests 300 --sustainable-rate 54 --overload 1.5 --light 0.3 --warmup-requests 300 \
    --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tee $R/slo.log | tail -9
tar czf $OUT/p4.tgz -C $R .
