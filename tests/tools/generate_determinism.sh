#!/usr/bin/env bash
# needle-generate gives the same ids for a preset on every run: greedy and seeded sampling, run twice
# each as separate processes, for each architecture's tiny preset; and different seeds differ.
set -euo pipefail
gen=$1
ids() { "$gen" --json --max-tokens 24 --ignore-eos --kv-cache-bytes 32000000 --prompt "needle determinism" "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generated"])'; }
for model in demo tiny-nsa tiny-llama-nsa tiny-nsa-paper tiny-llama; do
  for mode in "--temperature 0" "--temperature 0.9 --seed 11"; do
    a=$(ids --model "$model" $mode); b=$(ids --model "$model" $mode)
    if [ "$a" != "$b" ]; then echo "FAIL $model ($mode): $a vs $b"; exit 1; fi
    n=$(python3 -c "import sys; print(len(eval(sys.argv[1])))" "$a")
    [ "$n" = 24 ] || { echo "FAIL $model ($mode): $n tokens"; exit 1; }
  done
  x=$(ids --model "$model" --temperature 0.9 --seed 11); y=$(ids --model "$model" --temperature 0.9 --seed 12)
  [ "$x" != "$y" ] || { echo "FAIL $model: seeds 11 and 12 gave the same tokens"; exit 1; }
done
echo "needle-generate is deterministic"
