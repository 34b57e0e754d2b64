#!/usr/bin/env bash
# Call 1: issue 17 before / after (old = b7612f8 in .cmp/old17, new = this tree).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PAGEDSERVE_COMMIT=af1e0b2
R=/tmp/r1; mkdir -p $R
OLD_TREE=$PWD/.cmp/old17 OUT=$R timeout 550 bash benchmarks/gpu_suite.sh ab 2>&1 | tee $R/ab.log | tail -45
tar czf $OUT/call1.tgz -C $R .
