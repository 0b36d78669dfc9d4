// FillUniformBf16 (benchmarks/bench_fill.h): one splitmix64 hash per element, grid-stride.
#include "benchmarks/bench_fill.h"

#include <cuda_bf16.h>

namespace needle::bench {
namespace {

__global__ void FillUniformBf16Kernel(__nv_bfloat16* dst, size_t n, float lo, float span, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
    dst[i] = __float2bfloat16(lo + span * u);
  }
}

}  // namespace

cudaError_t FillUniformBf16(void* dst, size_t n, float lo, float hi, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const size_t blocks = (n + 255) / 256;
  FillUniformBf16Kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(
      static_cast<__nv_bfloat16*>(dst), n, lo, hi - lo, seed * 0xD1B54A32D192ED03ull);
  return cudaGetLastError();
}

}  // namespace needle::bench
