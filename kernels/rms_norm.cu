// RMSNorm: one thread block per row, about four elements per thread (64 to 1024 threads), so a
// decode step's single row is not one 256-thread block looping ten times; sum of squares in fp32,
// then a second pass that scales. Each thread rewrites exactly the elements it read, so x == y is
// safe.
#include "kernels/rms_norm.h"

#include "kernels/ops_common.cuh"

namespace needle::kernels {
namespace {

__global__ void RmsNormKernel(RmsNormParams p) {
  __shared__ float scratch[32];
  const int r = blockIdx.x;
  const int64_t src_row = p.row_index != nullptr ? p.row_index[r] : r;
  const __nv_bfloat16* x = p.x + src_row * p.x_stride;
  __nv_bfloat16* y = p.y + static_cast<int64_t>(r) * p.y_stride;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
    const float v = ToFloat(x[c]);
    ss = fmaf(v, v, ss);
  }
  ss = BlockSum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(p.hidden) + p.eps);
  for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
    y[c] = ToBf16(ToFloat(x[c]) * inv * ToFloat(p.weight[c]));
  }
}

}  // namespace

cudaError_t LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  if (p.num_rows < 0 || p.hidden <= 0 || p.x == nullptr || p.weight == nullptr || p.y == nullptr ||
      p.x_stride < p.hidden || p.y_stride < p.hidden) {
    return cudaErrorInvalidValue;
  }
  const int threads = min(1024, max(64, (p.hidden / 4 + 31) / 32 * 32));
  RmsNormKernel<<<p.num_rows, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace needle::kernels
