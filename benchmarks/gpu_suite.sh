#!/usr/bin/env bash
# The whole GPU check-and-measure suite, in parts that each fit one 10-minute device call:
#   benchmarks/gpu_suite.sh checks   # GPU tests (kernels vs twins at real shapes), tiny-model and
#                                    # 8B correctness
#   benchmarks/gpu_suite.sh speed    # batch-1 latency (+ its profile), offline throughput
#   benchmarks/gpu_suite.sh peers    # transformers static batches and continuous batching
#   benchmarks/gpu_suite.sh serving  # the OpenAI server under Poisson arrivals
#   benchmarks/gpu_suite.sh ab       # OLD_TREE=DIR: offline throughput (256 / 2048) and the server at 16 and 32
#                                    # req/s (benchmarks/serving_ab.py), old tree against this one, alternating
#   benchmarks/gpu_suite.sh slo      # SLO-aware server vs no objectives at 1.5x sustainable and light load
#   benchmarks/gpu_suite.sh moe      # Mixtral-8x7B-shaped (random weights drawn on the GPU): decode, mix
#   benchmarks/gpu_suite.sh sampler  # one step's sampling, realistic (old vs new) vs plain, [256, 128256]
#   benchmarks/gpu_suite.sh mixed    # a step with prefill beside N decodes vs the decodes alone
#                                    # (benchmarks/mixed_step.py): graphs, no mixed-step graphs, --enforce-eager
#   benchmarks/gpu_suite.sh quant    # quantized formats: 8B speed per format, SmolLM2 perplexity
#                                    # (benchmarks/quant_gpu.py). Split over calls, one JSON:
#       QUANT_PARTS=8b QUANT_FORMATS=bf16,gptq4,awq4,fp8 benchmarks/gpu_suite.sh quant
#       QUANT_PARTS=8b QUANT_FORMATS=fp8-load,squeezellm,gptq8 benchmarks/gpu_suite.sh quant
#       QUANT_PARTS=real benchmarks/gpu_suite.sh quant      # GGUF=path of the SmolLM2 Q4_1 file
#   benchmarks/gpu_suite.sh tp       # (2 GPUs) tp GPU tests, NCCL all-reduce, tp=2 vs tp=1 agreement
#   benchmarks/gpu_suite.sh tp-speed # (2 GPUs) batch-1 decode beside its floor, throughput, start-up at tp 1, 2
#   benchmarks/gpu_suite.sh tp70b    # (4 GPUs) Llama-3-70B-shaped dummy weights at tp=4
# Results (JSON + logs) go to $OUT (or benchmarks/results/raw); the 8B model is built once into
# $MODEL_DIR (default /tmp/llama3-8b-random).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
part="${1:-checks}"
out="${OUT:-benchmarks/results/raw}"
mkdir -p "$out"
model="${MODEL_DIR:-/tmp/llama3-8b-random}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PAGEDSERVE_COMMIT="${PAGEDSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"  # set it by hand on the device machine (its tree copy has no current .git)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/nvidia-smi.txt"
python3 -m benchmarks.build_model "$model" 2>&1 | tail -2

case "$part" in
  checks)
    python3 -m pytest -q -m gpu tests/kernels tests/models tests/engine tests/quant 2>&1 | tee "$out/gpu-tests.log" | tail -15
    python3 -m benchmarks.gpu_checks --model8b "$model" --json "$out/gpu_checks.json" 2>&1 | grep -v Loading | tail -30
    ;;
  speed)
    python3 -m benchmarks.latency --model "$model" --json "$out/latency.json" 2>&1 | grep -v Loading | tail -8
    python3 -m benchmarks.profile_decode --model "$model" --json "$out/profile.json" 2>&1 | grep -v Loading | tail -40
    python3 -m benchmarks.throughput --model "$model" --json "$out/throughput.json" 2>&1 | grep -v Loading | tail -6
    python3 -m benchmarks.throughput --model "$model" --max-num-seqs 512 --max-num-batched-tokens 8192 \
        --json "$out/throughput-512x8192.json" 2>&1 | grep -v Loading | tail -6
    ;;
  peers)
    python3 -m benchmarks.peers --model "$model" --json "$out/peers.json" 2>&1 | grep -vE "Loading|it/s]" | tail -30
    ;;
  serving)
    SERVER_LOG="$out/server.log" python3 -m benchmarks.serving --model "$model" \
        --server-args "--max-model-len 4096 --log-level WARNING" --json "$out/serving.json" 2>&1 | grep -v Loading | tail -12
    ;;
  ab)  # before / after of a change: OLD_TREE = a directory holding the old tree's pagedserve/ and
       # benchmarks/ (git archive OLD pagedserve benchmarks pyproject.toml | tar -x -C DIR, carried)
    old="${OLD_TREE:?set OLD_TREE to the old tree}"
    i=0
    for t in old new new old; do
      i=$((i+1)); tree="$PWD"; [ "$t" = old ] && tree="$old"
      (cd "$tree" && PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" python3 -m benchmarks.throughput --model "$model" \
          --max-num-seqs 256 --max-num-batched-tokens 2048 --json "$out/throughput-$t-$i.json" 2>&1 | grep -v Loading | tail -3)
    done
    python3 -m benchmarks.serving_ab --model "$model" --old-tree "$old" --rates 16 32 --repeats 2 \
        --log-dir "$out" --json "$out/serving_ab.json" 2>&1 | grep -v Loading | tail -14
    ;;
  slo)
    python3 -m benchmarks.slo_serving --model "$model" --out "$out/slo" --slo-tpot-ms 30 --slo-ttft-ms 2000 \
        --num-requests 1200 --probe-requests 1200 --light-requests 300 --start-rate 48 --bisect 1 \
        --server-args "--max-model-len 4096 --log-level WARNING" 2>&1 | grep -v Loading | tail -20
    ;;
  moe)
    python3 -m benchmarks.moe_gpu --json "$out/mixtral.json" 2>&1 | grep -vE "Loading|it/s]" | tail -20
    ;;
  sampler)
    python3 -m benchmarks.sampler_bench --json "$out/sampler_bench.json" 2>&1 | tail -8
    ;;
  mixed)
    python3 -m benchmarks.mixed_step --model "$model" --profile --json "$out/mixed_step.json" 2>&1 | grep -v Loading | tail -20
    python3 -m benchmarks.mixed_step --model "$model" --mixed-graph-max-tokens 0 --decodes 32 256 --prefill 16 512 \
        --json "$out/mixed_step-no-mixed-graphs.json" 2>&1 | grep -v Loading | tail -10
    python3 -m benchmarks.mixed_step --model "$model" --enforce-eager --decodes 32 256 --prefill 16 512 \
        --json "$out/mixed_step-eager.json" 2>&1 | grep -v Loading | tail -10
    ;;
  quant)
    python3 -m benchmarks.quant_gpu --model "$model" --gguf "${GGUF:-/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf}" \
        --parts "${QUANT_PARTS:-8b,real}" --formats "${QUANT_FORMATS:-bf16,gptq4,awq4,fp8,fp8-load,squeezellm,gptq8}" \
        --json "$out/quant.json" 2>&1 | grep -vE "Loading|Converting|it/s]" | tail -60
    ;;
  tp)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python3 -m pytest -q -m gpu tests/executor/test_tp_gpu.py 2>&1 | tee "$out/tp-gpu-tests.log" | tail -8
    python3 -m benchmarks.tp_gpu --model "$model" --tp 1 2 --parts nccl agree --json "$out/tp_agree.json" 2>&1 | grep -v Loading | tail -20
    ;;
  tp-speed)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python3 -m benchmarks.tp_gpu --model "$model" --tp 1 2 --parts decode throughput --json "$out/tp_speed.json" 2>&1 | grep -v Loading | tail -30
    ;;
  tp70b)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python3 -m benchmarks.tp_gpu --model "$model" --tp --parts decode throughput --model70b-dummy --json "$out/tp70b.json" 2>&1 | grep -v Loading | tail -30
    ;;
  *)
    echo "unknown part $part (checks | speed | peers | serving | ab | slo | moe | sampler | mixed | quant | tp | tp-speed | tp70b)"; exit 2;;
esac
