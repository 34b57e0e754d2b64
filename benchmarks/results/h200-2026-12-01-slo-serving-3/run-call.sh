#!/usr/bin/env bash
# Session 8, call 2: issue 15's SLO-aware server against no objectives (gpu_suite.sh slo), then the
# host-sync census with async scheduling (issue 13) in what time is left.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PAGEDSERVE_COMMIT=4c8e135
R=/tmp/r2; rm -rf $R; mkdir -p $R
start=$(date +%s)
OUT=$R timeout 500 bash benchmarks/gpu_suite.sh slo 2>&1 | tee $R/slo-suite.log | tail -25
echo "slo took $(( $(date +%s) - start )) s"
left=$(( 570 - ($(date +%s) - start) ))
if [ $left -gt 40 ]; then
  (export PYTHONPATH=/tmp/site:$PWD; timeout $left python3 -m benchmarks.sync_points --json $R/sync_async.json 2>&1 | grep -v "Loading\|Writing" | tail -25) | tee $R/sync.log
fi
tar czf $OUT/call2.tgz -C $R .
