#!/usr/bin/env bash
# Session 8, call 1: issue 17 before / after at the current commit (old = b7612f8 in .cmp/old17),
# then the host-sync census (issue 13) on a tiny model.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PAGEDSERVE_COMMIT=fd3d9a5
R=/tmp/r1; mkdir -p $R
start=$(date +%s)
OLD_TREE=$PWD/.cmp/old17 OUT=$R timeout 480 bash benchmarks/gpu_suite.sh ab 2>&1 | tee $R/ab.log | tail -45
echo "ab took $(( $(date +%s) - start )) s"
left=$(( 575 - ($(date +%s) - start) ))
if [ $left -gt 30 ]; then
  (export PYTHONPATH=/tmp/site:$PWD; timeout $((left/2)) python3 -m benchmarks.sync_points --json $R/sync_async.json 2>&1 | tail -25
   timeout $((left/2 - 5)) python3 -m benchmarks.sync_points --no-async-scheduling --json $R/sync_sync.json 2>&1 | tail -25) | tee $R/sync.log
fi
tar czf $OUT/call1.tgz -C $R .
