// RoPE: a thread block per (token, group of kHeadsPerBlock heads of q then k). Each block computes the
// token's cos/sin table (d/2 pairs, double) in shared memory, then its threads rotate the (head, i)
// pairs of its heads. Spreading the heads over blocks keeps a decode step (one token) from running
// as one block that walks every head serially.
#include "kernels/rope.h"

#include "kernels/ops_common.cuh"

namespace needle::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kHeadsPerBlock = 4;

__device__ __forceinline__ void Rotate(__nv_bfloat16* head, int i, int half, double c, double s) {
  const double a = ToFloat(head[i]), b = ToFloat(head[i + half]);
  head[i] = ToBf16(static_cast<float>(a * c - b * s));
  head[i + half] = ToBf16(static_cast<float>(b * c + a * s));
}

__global__ void RopeKernel(RopeParams p) {
  extern __shared__ double cs[];  // [half] cos, then [half] sin
  const int t = blockIdx.x;
  const int half = p.head_dim / 2;
  const int64_t pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[t]
                                        : static_cast<const int32_t*>(p.positions)[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    RopeCosSin(pos, RopeInvFreq(i, p.head_dim, p.theta), &cs[i], &cs[half + i]);
  }
  __syncthreads();
  const int nq = p.q != nullptr ? p.num_q_heads : 0;
  const int nk = p.k != nullptr ? p.num_k_heads : 0;
  const int h0 = blockIdx.y * kHeadsPerBlock;
  const int pairs = (min(nq + nk, h0 + kHeadsPerBlock) - h0) * half;
  for (int e = threadIdx.x; e < pairs; e += blockDim.x) {
    const int h = h0 + e / half, i = e % half;
    __nv_bfloat16* head = h < nq ? p.q + static_cast<int64_t>(t) * p.q_stride + static_cast<int64_t>(h) * p.head_dim
                                 : p.k + static_cast<int64_t>(t) * p.k_stride +
                                       static_cast<int64_t>(h - nq) * p.head_dim;
    Rotate(head, i, half, cs[i], cs[half + i]);
  }
}

}  // namespace

cudaError_t LaunchRope(const RopeParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || (p.q == nullptr && p.k == nullptr)) return cudaSuccess;
  if (p.num_tokens < 0 || p.head_dim <= 0 || p.head_dim % 2 != 0 || p.positions == nullptr ||
      (p.q != nullptr && (p.num_q_heads < 0 || p.q_stride < static_cast<int64_t>(p.num_q_heads) * p.head_dim)) ||
      (p.k != nullptr && (p.num_k_heads < 0 || p.k_stride < static_cast<int64_t>(p.num_k_heads) * p.head_dim))) {
    return cudaErrorInvalidValue;
  }
  const size_t smem = sizeof(double) * p.head_dim;
  const int heads = (p.q != nullptr ? p.num_q_heads : 0) + (p.k != nullptr ? p.num_k_heads : 0);
  if (heads == 0) return cudaSuccess;
  const dim3 grid(p.num_tokens, (heads + kHeadsPerBlock - 1) / kHeadsPerBlock);
  if (grid.y > 65535) return cudaErrorInvalidValue;
  RopeKernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace needle::kernels
