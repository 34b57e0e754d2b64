#!/usr/bin/env bash
# Next session, call 2 (issue 15): both servers at 1.5 x 54 req/s and at light load, with the
# controller's new series in the trace (tpot_signal_s, mixed_step_model_s, prefill_allowance).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=/tmp/n2; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/nvidia-smi.txt
python3 -m benchmarks.build_model /tmp/llama3-8b-random 2>&1 | tail -1
timeout 540 python3 -m benchmarks.slo_serving --model /tmp/llama3-8b-random --out $R/slo --slo-tpot-ms 30 --slo-ttft-ms 2000 \
    --num-requests 1200 --light-requests 300 --sustainable-rate 54 --overload 1.5 --light 0.3 --warmup-requests 300 \
    --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tee $R/slo.log | tail -12
tar czf $OUT/n2.tgz -C $R .
