#!/usr/bin/env bash
# Call 2: SmolLM2 (issue 19) from the GGUF joined on the device, then every GPU test.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .gg/whl/*.whl || exit 1
cp .gg/part_ab /tmp/smol/ && cat /tmp/smol/part_aa /tmp/smol/part_ab > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf && ls -l /tmp/smol
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PAGEDSERVE_COMMIT=${COMMIT:-unknown}
mkdir -p /tmp/res2
timeout 330 python3 -m benchmarks.smollm2_gpu --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf \
  --sha256 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 --json $OUT/smollm2_h200.json 2>&1 \
  | grep -vE "Loading|it/s]" > $OUT/smollm2.log; tail -60 $OUT/smollm2.log
timeout 230 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/models tests/engine > $OUT/gpu-tests.log 2>&1; tail -15 $OUT/gpu-tests.log
