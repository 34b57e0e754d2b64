#!/usr/bin/env bash
# h-runner: GPU tests of the new tree, then side-by-side speed (old = bb7ef29, new = h-runner)
set -u
R=.gpu/runner
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
M=/tmp/llama3-8b-random
if [ "${TESTS:-1}" = 1 ]; then
  (cd $R/new && PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
     tests/engine/test_cuda_graph_decode.py tests/engine/test_kv_cache_moves.py tests/engine/test_worker_no_tokenizer.py \
     tests/engine/test_structured_outputs.py tests/engine/test_async_scheduling.py -k "not preemption or structured" > $OUT/gpu-tests.log 2>&1; tail -5 $OUT/gpu-tests.log)
fi
(cd $R/new && PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.build_model $M 2>&1 | tail -1)
export PAGEDSERVE_COMMIT
i=0
for t in ${TPUT:-old new new old}; do
  i=$((i+1)); PAGEDSERVE_COMMIT=$t
  (cd $R/$t && PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.throughput --model $M --json "$OUT/tput-$t-$i.json" 2>&1 | grep -v Loading | tail -3)
done
for t in ${LAT:-old new}; do
  i=$((i+1)); PAGEDSERVE_COMMIT=$t
  (cd $R/$t && PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.latency --model $M --json "$OUT/lat-$t-$i.json" 2>&1 | grep -v Loading | tail -4)
done
