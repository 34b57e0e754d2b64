#!/usr/bin/env bash
# Call 4: issue 11's 8B-shaped formats (speed, memory), bf16 first.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PAGEDSERVE_COMMIT=af1e0b2+gidx-device-fix
R=/tmp/r4; mkdir -p $R
QUANT_PARTS=8b QUANT_FORMATS=bf16,gptq4,awq4,fp8 OUT=$R timeout 450 bash benchmarks/gpu_suite.sh quant 2>&1 | tee $R/quant-8b.log | tail -40
tar czf $OUT/call4.tgz -C $R .
