#!/usr/bin/env bash
# Front end per-token CPU: 157c348 (before), 175c752 (merged deltas, one-prompt fast path), this tree (+ uvloop); twice each.
source /work/venv/bin/activate
out=/tmp/fe_ab; mkdir -p $out
for round in 1 2; do
  for t in old:/tmp/oldfe merge:/tmp/mergefe uvloop:/work/main; do
    tag=${t%%:*}; dir=${t#*:}
    (cd $dir && timeout 300 python -m benchmarks.frontend_stream --streams 50 200 300 --tokens 100 \
       --json $out/$tag-$round.json > $out/$tag-$round.log 2>&1)
    echo "$tag $round done"
  done
done
