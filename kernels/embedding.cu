// Embedding gather: one thread block per token.
#include "kernels/embedding.h"

#include "kernels/ops_common.cuh"

namespace needle::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void EmbeddingKernel(EmbeddingParams p) {
  const int t = blockIdx.x;
  const int32_t id = p.token_ids[t];
  __nv_bfloat16* out = p.out + static_cast<int64_t>(t) * p.out_stride;
  if (id < 0 || id >= p.vocab) {
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) out[c] = ToBf16(0.0f);
    return;
  }
  const __nv_bfloat16* row = p.table + static_cast<int64_t>(id) * p.hidden;
  for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) out[c] = row[c];
}

}  // namespace

cudaError_t LaunchEmbedding(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_tokens < 0 || p.hidden <= 0 || p.vocab <= 0 || p.token_ids == nullptr || p.table == nullptr ||
      p.out == nullptr || p.out_stride < p.hidden) {
    return cudaErrorInvalidValue;
  }
  EmbeddingKernel<<<p.num_tokens, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace needle::kernels
