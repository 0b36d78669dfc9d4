// Device-side helpers of the benchmark programs (needle-kernel-bench, needle-read-bench):
// deterministic pseudo-random bf16 data for caches and queries, generated on the GPU (gigabytes of
// cache would take minutes from the host), the device-to-device copy bandwidth every table is
// measured against, and BENCH_CHECK. Plain C++ header over the CUDA runtime API; the code lives in bench_fill.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

// A benchmark has no way to go on after a failed CUDA call: print it (file, line, call, error) and
// exit 1.
#define BENCH_CHECK(expr)                                                                         \
  do {                                                                                            \
    const cudaError_t bench_err_ = (expr);                                                        \
    if (bench_err_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(bench_err_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

namespace needle::bench {

// Writes n bf16 values to dst: a hash of (seed, index) mapped uniformly to [lo, hi).
cudaError_t FillUniformBf16(void* dst, size_t n, float lo, float hi, uint64_t seed, cudaStream_t stream);

// Device-to-device copy bandwidth in GB/s, (bytes read + bytes written) / time, median of 10 timed
// cudaMemcpyAsync copies of 1 GiB after 2 untimed ones, into *gbps.
cudaError_t CopyBandwidthGBps(cudaStream_t stream, double* gbps);

}  // namespace needle::bench
