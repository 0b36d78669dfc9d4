#!/usr/bin/env bash
# Runs on the GPU machine from a folder made by pack.sh: every *_gpu_test binary with
# NEEDLE_REQUIRE_GPU=1 (a missing GPU fails), then each once more under compute-sanitizer memcheck.
# Logs go to $OUT (or ./gpu-logs); the last lines are a summary. Usage: run_gpu_tests.sh PACK_DIR
set -uo pipefail
source "$(dirname "$0")/pack_env.sh" "$1" gpu-logs
export NEEDLE_REQUIRE_GPU=1
sanitizer=/usr/local/cuda/bin/compute-sanitizer
summary=()
status=0
for bin in "$pack"/bin/*_gpu_test; do
  name=$(basename "$bin")
  timeout 300 "$bin" > "$out/$name.log" 2>&1
  rc=$?
  summary+=("$name: rc=$rc $(grep -hE '^\[  (PASSED|FAILED)' "$out/$name.log" | tr '\n' ' ')")
  [ $rc -eq 0 ] || status=1
  if [ -x "$sanitizer" ]; then
    timeout 500 "$sanitizer" --tool memcheck --print-limit 20 "$bin" ${MEMCHECK_FILTER:+--gtest_filter=$MEMCHECK_FILTER} \
      > "$out/$name.memcheck.log" 2>&1
    rc=$?
    summary+=("$name memcheck: rc=$rc $(grep -h 'ERROR SUMMARY' "$out/$name.memcheck.log")")
    [ $rc -eq 0 ] || status=1
  fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/device: /'
printf '%s\n' "${summary[@]}"
exit $status
