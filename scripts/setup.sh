#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test needle. Idempotent.
set -euo pipefail
pkgs=(
  build-essential cmake ninja-build ccache pkg-config git
  libabsl-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev googletest
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libcpp-httplib-dev  # the server's Prometheus metrics endpoint (--metrics_listen)
  python3 python3-grpcio python3-protobuf python3-grpc-tools
  # scripts/test.sh's reliability stages: clang with libFuzzer and its sanitizer runtimes, and
  # llvm-symbolizer for readable fuzzer reports (gcc's ASan/UBSan come with build-essential).
  clang libclang-rt-14-dev llvm-14
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
