// SwiGLU: a 2D grid (column blocks, tokens), one element per thread.
#include "kernels/swiglu.h"

#include "kernels/ops_common.cuh"

namespace needle::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void SwiGluKernel(SwiGluParams p) {
  const int t = blockIdx.y;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= p.width) return;
  const float g = ToFloat(p.gate[static_cast<int64_t>(t) * p.gate_stride + c]);
  const float u = ToFloat(p.up[static_cast<int64_t>(t) * p.up_stride + c]);
  p.out[static_cast<int64_t>(t) * p.out_stride + c] = ToBf16(g / (1.0f + expf(-g)) * u);
}

}  // namespace

cudaError_t LaunchSwiGlu(const SwiGluParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_tokens < 0 || p.width <= 0 || p.gate == nullptr ||
      p.up == nullptr || p.out == nullptr || p.gate_stride < p.width || p.up_stride < p.width ||
      p.out_stride < p.width) {
    return cudaErrorInvalidValue;
  }
  // gridDim.y is limited to 65535: split very long token ranges.
  for (int t0 = 0; t0 < p.num_tokens; t0 += 65535) {
    SwiGluParams q = p;
    q.num_tokens = p.num_tokens - t0 < 65535 ? p.num_tokens - t0 : 65535;
    q.gate += static_cast<int64_t>(t0) * p.gate_stride;
    q.up += static_cast<int64_t>(t0) * p.up_stride;
    q.out += static_cast<int64_t>(t0) * p.out_stride;
    const dim3 grid((p.width + kThreads - 1) / kThreads, q.num_tokens);
    SwiGluKernel<<<grid, kThreads, 0, stream>>>(q);
  }
  return cudaGetLastError();
}

}  // namespace needle::kernels
