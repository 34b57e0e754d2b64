#!/usr/bin/env bash
# Session 16, call 1: issue 13 before (ba75a98) / after, rows defaults, 512x8192, async at 256x2048, 1024x16384, batch1.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
R=$OUT/c1; mkdir -p "$R"; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R"/nvidia-smi.txt
python3 -m benchmarks.build_model /tmp/llama3-8b-random > "$R"/build.log 2>&1
M=/tmp/llama3-8b-random
timeout 400 python3 -m benchmarks.speed_round --model $M --tree old=.cmp/old13 --tree new=. --profile new \
   --rows defaults,512x8192,batch1 --timeout 150 --json "$R"/round-a.json 2>&1 | grep -v Loading | tee "$R"/round-a.log | tail -12
left=$(( 560 - ($(date +%s) - start) ))
timeout $left python3 -m benchmarks.speed_round --model $M --tree old=.cmp/old13 \
   --rows 256x2048-async,1024x16384 --timeout 120 --json "$R"/round-b.json 2>&1 | grep -v Loading | tee "$R"/round-b.log | tail -6
echo "total $(( $(date +%s) - start )) s"
