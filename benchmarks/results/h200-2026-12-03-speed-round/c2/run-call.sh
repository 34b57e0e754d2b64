#!/usr/bin/env bash
# Session 16, call 2: issue 13 before (ba75a98) / after, rows realistic-sampling, long-prompts, long-outputs; transformers CB configured for throughput.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PAGEDSERVE_COMMIT=${COMMIT:-wip}
R=$OUT/c2; mkdir -p "$R"; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R"/nvidia-smi.txt
python3 -m benchmarks.build_model /tmp/llama3-8b-random > "$R"/build.log 2>&1
M=/tmp/llama3-8b-random
timeout 420 python3 -m benchmarks.speed_round --model $M --tree old=.cmp/old13 --tree new=. --profile new \
   --rows realistic-sampling,long-prompts,long-outputs --timeout 130 --json "$R"/round-c.json 2>&1 | grep -v Loading | tee "$R"/round-c.log | tail -9
left=$(( 575 - ($(date +%s) - start) ))
echo "peers with $left s left"
timeout $left python3 -m benchmarks.peers --model $M --skip-static --cb-throughput --cb-requests 200 \
   --json "$R"/peers-cb.json 2>&1 | grep -vE "Loading|it/s]" | tee "$R"/peers.log | tail -6
echo "total $(( $(date +%s) - start )) s"
