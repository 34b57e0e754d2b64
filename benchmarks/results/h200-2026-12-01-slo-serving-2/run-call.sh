#!/usr/bin/env bash
# Call 2: issue 15 (SLO-aware server vs no objectives); stage the GGUF's first part.
set -u
mkdir -p /tmp/smol && cp .gg/part_aa /tmp/smol/ && ls -l /tmp/smol
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PAGEDSERVE_COMMIT=af1e0b2
R=/tmp/r2; mkdir -p $R
OUT=$R timeout 540 bash benchmarks/gpu_suite.sh slo 2>&1 | tee $R/slo-suite.log | tail -40
tar czf $OUT/call2.tgz -C $R .
