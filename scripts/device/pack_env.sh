# Sourced by the device-side scripts: `source scripts/device/pack_env.sh PACK_DIR DEFAULT_LOG_DIR`
# sets `pack` (the folder made by pack.sh, absolute), `out` ($OUT, or DEFAULT_LOG_DIR under the
# current folder; created) and puts the pack's libraries and the CUDA toolkit's on LD_LIBRARY_PATH.
pack=$(cd "$1" && pwd)
out=${OUT:-$PWD/$2}
mkdir -p "$out"
export LD_LIBRARY_PATH="$pack/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
