// FillUniformBf16 (benchmarks/bench_fill.h): one splitmix64 hash per element, grid-stride; and
// CopyBandwidthGBps.
#include "benchmarks/bench_fill.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <vector>

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

cudaError_t CopyBandwidthGBps(cudaStream_t stream, double* gbps) {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  std::vector<double> runs;
  cudaError_t e = cudaMalloc(&a, bytes);
  if (e == cudaSuccess) e = cudaMalloc(&b, bytes);
  if (e == cudaSuccess) e = cudaMemsetAsync(a, 1, bytes, stream);
  if (e == cudaSuccess) e = cudaEventCreate(&start);
  if (e == cudaSuccess) e = cudaEventCreate(&stop);
  for (int i = 0; i < 12 && e == cudaSuccess; ++i) {
    if (i >= 2) e = cudaEventRecord(start, stream);
    if (e == cudaSuccess) e = cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream);
    if (e == cudaSuccess && i >= 2) {
      float ms = 0;
      e = cudaEventRecord(stop, stream);
      if (e == cudaSuccess) e = cudaEventSynchronize(stop);
      if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, start, stop);
      if (e == cudaSuccess) runs.push_back(2.0 * bytes / (ms * 1e-3) / 1e9);
    }
  }
  if (start != nullptr) cudaEventDestroy(start);
  if (stop != nullptr) cudaEventDestroy(stop);
  cudaFree(a);
  cudaFree(b);
  if (e != cudaSuccess) return e;
  std::sort(runs.begin(), runs.end());
  *gbps = runs[runs.size() / 2];
  return cudaSuccess;
}

}  // namespace needle::bench
