#!/usr/bin/env bash
# Call 3: issue 19 (SmolLM2 GGUF on the H200) and issue 11's real-model perplexities.
set -u
START=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .gg/whl/*.whl || exit 1
cp .gg/part_ab /tmp/smol/ && cat /tmp/smol/part_aa /tmp/smol/part_ab > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf && ls -l /tmp/smol
export PYTHONPATH=/tmp/site:$PWD PAGEDSERVE_COMMIT=af1e0b2 PYTHONUNBUFFERED=1
R=/tmp/r3; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee $R/nvidia-smi.txt
timeout 280 python3 -m benchmarks.smollm2_gpu --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf \
  --sha256 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 --json $R/smollm2_h200.json 2>&1 \
  | grep -vE "Loading|it/s]" > $R/smollm2.log; tail -40 $R/smollm2.log
T=$(( 500 - $(date +%s) + START ))
[ $T -gt 40 ] && QUANT_PARTS=real OUT=$R timeout $T bash benchmarks/gpu_suite.sh quant 2>&1 | tee $R/quant-real.log | tail -30
tar czf $OUT/call3.tgz -C $R .
