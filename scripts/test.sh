#!/usr/bin/env bash
# Installs what is missing, builds needle (CUDA code compiled when nvcc is present) and runs every
# ctest suite: unit, e2e and soak (GPU tests skip without a GPU; NEEDLE_REQUIRE_GPU=1 makes them fail
# instead). Arguments go to that ctest run. Then the reliability stages (docs/reliability.md):
#   - AddressSanitizer + UndefinedBehaviorSanitizer build of the host code (CUDA off, -fno-sanitize-
#     recover, in build-asan): the unit and e2e suites again;
#   - libFuzzer targets (clang, in build-fuzz): each runs FUZZ_SECONDS (default 45) from its seed corpus.
# SANITIZE=0 skips the sanitizer stage, FUZZ_SECONDS=0 the fuzzing stage. With arguments (a ctest
# selection such as -L unit) only the first stage runs, unless SANITIZE or FUZZ_SECONDS is set.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
JOBS=${JOBS:-$(nproc)}
BUILD_DIR=${BUILD_DIR:-build}
if [ $# -eq 0 ]; then
  SANITIZE=${SANITIZE:-1}
  FUZZ_SECONDS=${FUZZ_SECONDS:-45}
else
  SANITIZE=${SANITIZE:-0}
  FUZZ_SECONDS=${FUZZ_SECONDS:-0}
fi
start=$SECONDS
stage() { echo "== scripts/test.sh [$((SECONDS - start)) s] $*"; }

stage "build ($BUILD_DIR) and ctest: unit, e2e, soak"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo} ${CMAKE_ARGS:-}
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS" "$@"

if [ "$SANITIZE" != 0 ]; then
  ASAN_DIR=${ASAN_BUILD_DIR:-build-asan}
  stage "ASan + UBSan build ($ASAN_DIR) and ctest: unit, e2e"
  cmake -S . -B "$ASAN_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNEEDLE_ENABLE_CUDA=OFF \
    -DNEEDLE_SANITIZE=address,undefined -DCMAKE_CXX_FLAGS=-fno-sanitize-recover=all
  cmake --build "$ASAN_DIR" -j "$JOBS"
  # Child processes (needle-server under the e2e tests) inherit these; LeakSanitizer checks every
  # process at exit. The soak (label soak) is a load test: too slow under ASan, it runs in stage 1.
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} \
  UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
    ctest --test-dir "$ASAN_DIR" --output-on-failure -j "$JOBS" -L 'unit|e2e'
fi

if [ "$FUZZ_SECONDS" != 0 ]; then
  FUZZ_DIR=${FUZZ_BUILD_DIR:-build-fuzz}
  stage "libFuzzer build ($FUZZ_DIR) and ${FUZZ_SECONDS} s per fuzz target"
  cmake -S . -B "$FUZZ_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
    -DNEEDLE_ENABLE_CUDA=OFF -DNEEDLE_FUZZ=ON -DNEEDLE_SANITIZE=address,undefined \
    "-DCMAKE_CXX_FLAGS=-fsanitize=fuzzer-no-link -fno-sanitize-recover=all"
  cmake --build "$FUZZ_DIR" -j "$JOBS" --target fuzz_safetensors_header fuzz_model_config fuzz_generate_request
  fuzz/run_fuzzers.sh "$FUZZ_DIR" "$FUZZ_SECONDS"
fi
stage "done"
