#!/usr/bin/env bash
# Copies built executables and the shared libraries they need (minus the C runtime, which the GPU
# machine has) into a self-contained folder that can be carried to a GPU machine with a different
# distribution (CUDA libraries excepted: run with LD_LIBRARY_PATH=OUT_DIR/lib:/usr/local/cuda/lib64).
# Usage: scripts/device/pack.sh OUT_DIR BINARY...
set -euo pipefail
out=$1; shift
mkdir -p "$out/bin" "$out/lib"
for bin in "$@"; do
  cp "$bin" "$out/bin/"
  strip --strip-unneeded "$out/bin/$(basename "$bin")" 2>/dev/null || true
  ldd "$bin" | awk '/=> \//{print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) continue ;;
      libcuda.so*|libcudart.so*|libcublas*.so*|libnv*.so*) continue ;;  # the GPU machine has CUDA 13 in /usr/local/cuda
    esac
    [ -f "$out/lib/$(basename "$lib")" ] || cp -L "$lib" "$out/lib/"
  done
done
strip --strip-unneeded "$out"/lib/*.so* 2>/dev/null || true
du -sh "$out"
