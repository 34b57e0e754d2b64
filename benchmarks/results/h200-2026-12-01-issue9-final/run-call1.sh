#!/usr/bin/env bash
# Call 1: issue 9's side-by-side speed (old = 3a7d988, the commit before the model-side contract;
# new = this tree), alternating order, after one warm-up run; also stages GGUF part one.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/smol /tmp/res && cp .gg/part_aa /tmp/smol/ && ls -l /tmp/smol
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee /tmp/res/nvidia-smi.txt
export PYTHONUNBUFFERED=1
M=/tmp/llama3-8b-random
NEW=$PWD OLD=$PWD/.cmp/old
(PYTHONPATH=/tmp/site:$NEW python3 -m benchmarks.build_model $M 2>&1 | tail -1)
run() {  # run TAG N MODULE ARGS...
  local t=$1 i=$2 mod=$3; shift 3
  local tree=$NEW c=${NEWC:-new}; [ "$t" = old ] && tree=$OLD c=3a7d988
  echo "== $i $t $mod"
  (cd $tree && PAGEDSERVE_COMMIT=$c PYTHONPATH=/tmp/site:$tree timeout 150 python3 -m benchmarks.$mod \
     --model $M --json /tmp/res/$mod-$t-$i.json "$@" 2>&1 | grep -vE "Loading|it/s]" | tail -3)
}
run new 0 throughput --num-requests 200
i=0
for t in ${TPUT:-old new new old old new}; do i=$((i+1)); run $t $i throughput; done
for t in ${LAT:-new old}; do i=$((i+1)); run $t $i latency --contexts 128 2048; done
tar czf $OUT/call1.tgz -C /tmp/res .
