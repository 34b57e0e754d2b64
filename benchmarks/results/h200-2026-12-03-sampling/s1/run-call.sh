#!/usr/bin/env bash
# Session 17, call 1: the sync-free sampler draw. GPU tests of the sampler kernels; then the
# realistic-sampling and defaults rows on 46f5b8c (prev) and the working tree (new), new profiled
# (with the host-sync audit).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
R=$OUT/s1; mkdir -p "$R"; start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R"/nvidia-smi.txt
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_sampling_kernels.py tests/engine/test_sampler.py \
   tests/engine/test_sampler_state.py -p no:cacheprovider 2>&1 | tail -25 | tee "$R"/pytest-gpu.log
echo "tests done at $(( $(date +%s) - start )) s"
python3 -m benchmarks.build_model /tmp/llama3-8b-random > "$R"/build.log 2>&1
M=/tmp/llama3-8b-random
left=$(( 560 - ($(date +%s) - start) ))
timeout $left python3 -m benchmarks.speed_round --model $M --tree prev=.cmp/prev --tree new=. --profile new \
   --rows realistic-sampling,defaults --timeout 110 --json "$R"/round.json 2>&1 | grep -v Loading | tee "$R"/round.log | tail -8
echo "total $(( $(date +%s) - start )) s"
