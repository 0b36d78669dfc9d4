#!/usr/bin/env bash
# End to end at long context on the GPU machine, from a folder made by scripts/device/pack.sh holding
# needle-server, needle-bench and needle-generate. For each model:
#   1. needle-server (CUDA, graphs on), then needle-bench at concurrency 1 (O1 output tokens) and at
#      concurrency 8 (one wave of 8 requests, O8 output tokens: enough that every request is still
#      decoding when the last prefill ends, so that needle-bench's "all C decoding" row is the batch-8
#      decode step alone), then SIGTERM;
#   2. a profile of two decode steps after an L-token prompt: needle-generate launch by launch under
#      ncu, kernels inside the executor's "needle.decode" NVTX ranges only, at the GPU's own clocks and
#      without cache flushes; benchmarks/step_profile.py sums them by kind (attention, GEMM, other).
# Logs and JSON go to $OUT (or ./e2e-logs). Usage: benchmarks/e2e_on_device.sh PACK_DIR MODEL...
# Environment: L (prompt tokens, default 65536), O1 (default 64), O8 (default 1024), SKIP_BENCH=1 or
# SKIP_PROFILE=1 to run one half only.
set -uo pipefail
source "$(dirname "$0")/../scripts/device/pack_env.sh" "$1" e2e-logs
shift
L=${L:-65536}
O1=${O1:-64}
O8=${O8:-1024}
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
here=$(cd "$(dirname "$0")" && pwd)
server_flags=(--backend cuda --kv_cache_fraction 0.85 --max_batch 16 --prefill_chunk 8192 --step_token_budget 16384)

for model in "$@"; do
  if [ "${SKIP_BENCH:-0}" != 1 ]; then
    "$pack/bin/needle-server" --model "$model" "${server_flags[@]}" > "$out/$model.server.log" 2>&1 &
    server=$!
    for c in 1 8; do
      o=$O1
      [ "$c" = 8 ] && o=$O8
      timeout 420 "$pack/bin/needle-bench" --concurrency "$c" --requests "$c" --prompt-tokens "$L" --max-tokens "$o" \
        --warmup 0 --no-progress --label "$model C=$c" --json "$out/$model.c$c.json" > "$out/$model.c$c.log" 2>&1
      echo "== $model C=$c (rc $?)"
      cat "$out/$model.c$c.log"
    done
    kill -TERM "$server"
    wait "$server"
  fi
  if [ "${SKIP_PROFILE:-0}" != 1 ] && [ -x "$ncu" ]; then
    python3 -c "print(' '.join(str(10 + i % 1000) for i in range($L)))" > "$out/prompt.txt"
    timeout 420 "$ncu" --nvtx --nvtx-include "needle.decode/" --clock-control none --cache-control none \
      --metrics gpu__time_duration.sum --csv --print-units base \
      "$pack/bin/needle-generate" --model "$model" --backend cuda --cuda_graphs=false --kv_cache_fraction 0.85 \
      --prefill_chunk 8192 --prompt_ids "$out/prompt.txt" --max_tokens 3 --ignore_eos --json \
      > "$out/$model.profile.csv" 2> "$out/$model.profile.err"
    echo "== $model decode-step profile (rc $?)"
    python3 "$here/step_profile.py" "$out/$model.profile.csv" --steps 2 --json "$out/$model.profile.json"
  fi
done
