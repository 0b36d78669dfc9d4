#!/usr/bin/env bash
# Installs what is missing, builds needle, starts needle-server on the built-in demo model and streams
# one completion through needle-client, which prints its per-token latency report. Extra arguments
# go to needle-client (e.g. --prompt-tokens 4096 --max-tokens 64).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo} ${CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j "${JOBS:-$(nproc)}" --target needle-server needle-client

log=$(mktemp)
"$BUILD_DIR"/server/needle-server --model "${MODEL:-demo}" --listen 127.0.0.1:0 >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
addr=""
for _ in $(seq 1 300); do
  addr=$(sed -n 's/^needle-server listening on \(.*\)$/\1/p' "$log" | head -n1)
  [ -n "$addr" ] && break
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "needle-server did not start"; cat "$log"; exit 1; }
echo "needle-server is serving the ${MODEL:-demo} model on $addr"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--prompt "Once upon a time, in a sparse attention kernel," --max-tokens 64 --temperature 0.8 --seed 7)
"$BUILD_DIR"/clients/needle-client --server "$addr" --wait-ready-s 120 "${args[@]}"
