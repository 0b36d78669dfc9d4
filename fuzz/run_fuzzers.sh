#!/usr/bin/env bash
# Runs every libFuzzer target of a NEEDLE_FUZZ=ON build for a bounded time each:
#
#   fuzz/run_fuzzers.sh BUILD_DIR [SECONDS_EACH]      (default 45 s; scripts/test.sh uses this)
#
# Each target starts from its committed seed corpus (copied to a scratch directory: the checkout is
# not modified) plus its kept crash inputs (fuzz/regressions/<target>/), with its dictionary when
# there is one. A crash, sanitizer report, leak, timeout (10 s per input) or out-of-memory (2 GiB)
# fails the run; the reproducer is copied into fuzz/regressions/<target>/ so that, once committed,
# the regular ctest replay (fuzz_<target>_replay) keeps checking it. Fix the bug, keep the file.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:?usage: fuzz/run_fuzzers.sh BUILD_DIR [SECONDS_EACH]}
SECONDS_EACH=${2:-45}
targets=(safetensors_header model_config generate_request)

# Symbolized stacks in reports (llvm-14 from scripts/setup.sh provides the symbolizer).
if [ -z "${ASAN_SYMBOLIZER_PATH:-}" ] && [ -x /usr/lib/llvm-14/bin/llvm-symbolizer ]; then
  export ASAN_SYMBOLIZER_PATH=/usr/lib/llvm-14/bin/llvm-symbolizer
fi
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
  bin="$BUILD_DIR/fuzz/fuzz_$t"
  [ -x "$bin" ] || { echo "run_fuzzers: $bin is missing (build with -DNEEDLE_FUZZ=ON)"; exit 2; }
  mkdir -p "$work/$t/corpus" "$work/$t/artifacts" "fuzz/regressions/$t"
  cp fuzz/corpus/"$t"/* "$work/$t/corpus/"
  args=("$work/$t/corpus" "fuzz/regressions/$t" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048
        -max_len=4096 -print_final_stats=1 -artifact_prefix="$work/$t/artifacts/")
  [ -f "fuzz/dicts/$t.dict" ] && args+=(-dict="fuzz/dicts/$t.dict")
  echo "== fuzz_$t: ${SECONDS_EACH} s"
  if "$bin" "${args[@]}" >"$work/$t/log" 2>&1; then
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$work/$t/log" | tr '\n' ' '
    echo "(corpus $(ls "$work/$t/corpus" | wc -l) inputs)"
  else
    tail -n 60 "$work/$t/log"
    for a in "$work/$t/artifacts"/*; do
      [ -f "$a" ] || continue
      cp "$a" "fuzz/regressions/$t/"
      echo "fuzz_$t: kept $(basename "$a") in fuzz/regressions/$t/ (replayed by ctest: fuzz_${t}_replay)"
    done
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "run_fuzzers: FAILED: ${failed[*]}"
  exit 1
fi
echo "run_fuzzers: all targets ran ${SECONDS_EACH} s without a finding"
