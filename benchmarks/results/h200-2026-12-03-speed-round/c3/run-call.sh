#!/usr/bin/env bash
# Session 16, call 3: issue 13, the new tree's repeats (defaults twice), 256x2048 async and sync, shared prefix; transformers static batch 32.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
R=$OUT/c3; mkdir -p "$R"; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R"/nvidia-smi.txt
python3 -m benchmarks.build_model /tmp/llama3-8b-random > "$R"/build.log 2>&1
M=/tmp/llama3-8b-random
timeout 290 python3 -m benchmarks.speed_round --model $M --tree new=. \
   --rows defaults,256x2048-async,256x2048-sync,defaults,shared-prefix --timeout 100 --json "$R"/round-d.json 2>&1 | grep -v Loading | tee "$R"/round-d.log | tail -8
left=$(( 410 - ($(date +%s) - start) ))
echo "peers with $left s left"
timeout $left python3 -m benchmarks.peers --model $M --skip-cb --static-requests 32 --static-batch 32 \
   --json "$R"/peers-static.json 2>&1 | grep -vE "Loading|it/s]" | tee "$R"/peers.log | tail -4
echo "total $(( $(date +%s) - start )) s"
