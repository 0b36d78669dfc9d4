// Device-side helpers of the benchmark programs (needle-kernel-bench, needle-read-bench):
// deterministic pseudo-random bf16 data for caches and queries, generated on the GPU (gigabytes of
// cache would take minutes from the host), and the device-to-device copy bandwidth every table is
// measured against. Plain C++ header over the CUDA runtime API; the code lives in bench_fill.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace needle::bench {

// Writes n bf16 values to dst: a hash of (seed, index) mapped uniformly to [lo, hi).
cudaError_t FillUniformBf16(void* dst, size_t n, float lo, float hi, uint64_t seed, cudaStream_t stream);

// Device-to-device copy bandwidth in GB/s, (bytes read + bytes written) / time, median of 10 timed
// cudaMemcpyAsync copies of 1 GiB after 2 untimed ones, into *gbps.
cudaError_t CopyBandwidthGBps(cudaStream_t stream, double* gbps);

}  // namespace needle::bench
