#!/usr/bin/env bash
# One batched GPU session for the decode attention kernels, from a folder made by
# scripts/device/pack.sh (nsa_attention_gpu_test, dense_attention_gpu_test, needle-kernel-bench):
# the two attention test binaries, memcheck and racecheck on the split-KV tests with small shapes,
# needle-kernel-bench over every configuration (plus the single-kernel paths), an ncu pass over two
# configurations, and benchmarks/sdpa_baseline.py when torch is there. Logs and JSON go to $OUT (or
# ./perf-logs); the last lines are a summary. Usage: benchmarks/run_on_device.sh PACK_DIR [BENCH_FLAGS...]
set -uo pipefail
source "$(dirname "$0")/../scripts/device/pack_env.sh" "$1" perf-logs
shift
export NEEDLE_REQUIRE_GPU=1
san=/usr/local/cuda/bin/compute-sanitizer
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
summary=()
step() {  # step NAME TIMEOUT_S CMD...: runs CMD into $out/NAME.log, records rc and the gtest verdict
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  summary+=("$name: rc=$rc $((SECONDS - t0))s $(grep -hE '^\[  (PASSED|FAILED)|ERROR SUMMARY|RACECHECK SUMMARY' "$out/$name.log" | tr '\n' ' ')")
}
nsa_small='NsaDecodeSplitKvGpuTest.TiesGoToLowerBlockIndex:NsaDecodeSplitKvGpuTest.SplitCountsAndSmallWorkspace'
dense_small='DenseAttentionGpuTest.SplitKvDecode'
step nsa_test 80 "$pack/bin/nsa_attention_gpu_test"
step dense_test 50 "$pack/bin/dense_attention_gpu_test"
step bench 150 "$pack/bin/needle-kernel-bench" --single_kernel --json "$out/bench.json" "$@"
if [ -x "$san" ]; then
  step nsa_memcheck 35 "$san" --tool memcheck --print-limit 20 "$pack/bin/nsa_attention_gpu_test" --gtest_filter="$nsa_small"
  step dense_memcheck 25 "$san" --tool memcheck --print-limit 20 "$pack/bin/dense_attention_gpu_test" --gtest_filter="$dense_small"
  step nsa_racecheck 25 "$san" --tool racecheck --print-limit 20 "$pack/bin/nsa_attention_gpu_test" \
    --gtest_filter='NsaDecodeSplitKvGpuTest.TiesGoToLowerBlockIndex'
fi
if [ -x "$ncu" ]; then
  step ncu 35 "$ncu" -k regex:"Nsa|Dense" --section SpeedOfLight --section WarpStateStats --section LaunchStats --csv --page details \
    "$pack/bin/needle-kernel-bench" --profile --geometries paper,fla --contexts 65536 --batches 1,32
fi
if python3 -c 'import torch' 2> /dev/null; then
  step sdpa 60 python3 benchmarks/sdpa_baseline.py --json "$out/sdpa.json"
else
  summary+=("sdpa: skipped (no torch on this machine)")
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/device: /'
grep -hE '^(paper|fla|single|device)' "$out/bench.log" | head -60
[ -f "$out/sdpa.log" ] && tail -45 "$out/sdpa.log"
printf '%s\n' "${summary[@]}"
