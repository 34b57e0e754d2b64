#!/usr/bin/env bash
# Side-by-side speed of this tree and another one (its predecessor, say) on one machine, in
# alternating order so that drift hits both: offline throughput at the defaults and batch-1 decode.
#   benchmarks/ab_speed.sh OTHER_TREE [throughput|latency|both] [ROUNDS]
# OTHER_TREE: a checkout or `git archive` of the other commit. Results (JSON) go to $OUT as
# {throughput,latency}-{new,old}-N.json; the 8B model is built once into $MODEL_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
new="$PWD"
old="$(cd "$1" && pwd)"
part="${2:-both}"
rounds="${3:-1}"
out="${OUT:-benchmarks/results/raw}"
mkdir -p "$out"
model="${MODEL_DIR:-/tmp/llama3-8b-random}"
export PYTHONUNBUFFERED=1
PYTHONPATH="$new" python3 -m benchmarks.build_model "$model" 2>&1 | tail -1

bench() {  # bench TREE TAG MODULE ARGS...: run TREE's own benchmark module against TREE's package
  local tree="$1" tag="$2" module="$3"; shift 3
  (cd "$tree" && PYTHONPATH="$tree" python3 -m "benchmarks.$module" --model "$model" \
      --json "$out/$module-$tag.json" "$@" 2>&1 | grep -vE "Loading|it/s]" | tail -4)
}

for ((i = 1; i <= rounds; i++)); do
  first=new; second=old
  if ((i % 2 == 0)); then first=old; second=new; fi
  for tag in "$first" "$second"; do
    tree="$new"; [[ "$tag" == old ]] && tree="$old"
    echo "== round $i: $tag ($tree)"
    if [[ "$part" == throughput || "$part" == both ]]; then bench "$tree" "$tag-$i" throughput; fi
    if [[ "$part" == latency || "$part" == both ]]; then bench "$tree" "$tag-$i" latency --contexts 128; fi
  done
done
