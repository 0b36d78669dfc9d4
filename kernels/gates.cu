// Gate kernels: element-wise, one thread per output element.
#include "kernels/gates.h"

#include "kernels/ops_common.cuh"

namespace needle::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void GateSigmoidKernel(GateSigmoidParams p, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int per_token = 3 * p.num_heads;
  const int64_t t = e / per_token;
  const int j = static_cast<int>(e - t * per_token);
  const float x = ToFloat(p.logits[t * p.logits_stride + j]);
  p.gates[e] = 1.0f / (1.0f + expf(-x));
}

__global__ void GatedCombineKernel(GatedCombineParams p, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int per_token = p.num_heads * p.head_dim;
  const int64_t t = e / per_token;
  const int col = static_cast<int>(e - t * per_token);
  const int h = col / p.head_dim;
  const float* g = p.gates + (t * p.num_heads + h) * 3;
  float acc = 0.0f;
  for (int b = 0; b < 3; ++b) {
    if (p.branch[b] != nullptr) acc = fmaf(g[b], ToFloat(p.branch[b][t * p.branch_stride[b] + col]), acc);
  }
  p.out[t * p.out_stride + col] = ToBf16(acc);
}

unsigned Blocks(int64_t total) { return static_cast<unsigned>((total + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t LaunchGateSigmoid(const GateSigmoidParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_tokens < 0 || p.num_heads <= 0 || p.logits == nullptr || p.gates == nullptr ||
      p.logits_stride < 3 * p.num_heads) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = static_cast<int64_t>(p.num_tokens) * 3 * p.num_heads;
  GateSigmoidKernel<<<Blocks(total), kThreads, 0, stream>>>(p, total);
  return cudaGetLastError();
}

cudaError_t LaunchGatedCombine(const GatedCombineParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  const int64_t row = static_cast<int64_t>(p.num_heads) * p.head_dim;
  if (p.num_tokens < 0 || p.num_heads <= 0 || p.head_dim <= 0 || p.gates == nullptr || p.out == nullptr ||
      p.out_stride < row) {
    return cudaErrorInvalidValue;
  }
  for (int b = 0; b < 3; ++b) {
    if (p.branch[b] != nullptr && p.branch_stride[b] < row) return cudaErrorInvalidValue;
  }
  const int64_t total = static_cast<int64_t>(p.num_tokens) * row;
  GatedCombineKernel<<<Blocks(total), kThreads, 0, stream>>>(p, total);
  return cudaGetLastError();
}

}  // namespace needle::kernels
