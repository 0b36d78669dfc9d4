// Device-side fills for needle-kernel-bench: deterministic pseudo-random bf16 data for caches and
// queries, generated on the GPU (gigabytes of cache would take minutes from the host). Plain C++
// header over the CUDA runtime API; the kernels live in bench_fill.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace needle::bench {

// Writes n bf16 values to dst: a hash of (seed, index) mapped uniformly to [lo, hi).
cudaError_t FillUniformBf16(void* dst, size_t n, float lo, float hi, uint64_t seed, cudaStream_t stream);

}  // namespace needle::bench
