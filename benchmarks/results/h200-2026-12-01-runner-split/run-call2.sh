#!/usr/bin/env bash
set -u
R=.gpu/runner
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
M=/tmp/llama3-8b-random
(cd $R/new && PYTHONPATH=/tmp/site:$PWD timeout 120 python3 -m pytest -q -x -p no:cacheprovider \
   tests/engine/test_worker_no_tokenizer.py > $OUT/gpu-tests2.log 2>&1; tail -2 $OUT/gpu-tests2.log)
(cd $R/new && PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.build_model $M 2>&1 | tail -1)
(cd $R/old && PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.throughput --model $M --num-requests 100 2>&1 | grep -v Loading | tail -1)
i=0
for t in new old old new; do
  i=$((i+1)); export PAGEDSERVE_COMMIT=$t
  (cd $R/$t && PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.throughput --model $M --json "$OUT/tput-$t-$i.json" 2>&1 | grep -v Loading | tail -1)
done
for t in ${LAT:-}; do
  i=$((i+1)); export PAGEDSERVE_COMMIT=$t
  (cd $R/$t && PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.latency --model $M --json "$OUT/lat-$t-$i.json" 2>&1 | grep -v Loading | tail -3)
done
