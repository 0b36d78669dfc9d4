// KV append kernel: a grid of (token, slice of kThreads elements); each thread copies one (head, column)
// element of K and one of V, so a decode step's few tokens still spread over many blocks.
#include "kernels/kv_append.h"

#include "kernels/ops_common.cuh"

namespace needle::kernels {
namespace {

constexpr int kThreads = 128;

__device__ void CopyElement(const __nv_bfloat16* src, const PagedPool& pool, int64_t slot, int e) {
  const int d = pool.head_dim;
  if (e >= pool.num_kv_heads * d) return;
  const int h = e / d, c = e - h * d;
  PoolRow<__nv_bfloat16>(pool, h, slot)[c] = src[e];
}

__global__ void KvAppendKernel(KvAppendParams p) {
  const int t = blockIdx.x;
  const int64_t slot = p.slots[t];
  if (slot < 0) return;
  const int e = blockIdx.y * kThreads + threadIdx.x;
  CopyElement(p.k + static_cast<int64_t>(t) * p.k_stride, p.k_pool, slot, e);
  if (p.v != nullptr) CopyElement(p.v + static_cast<int64_t>(t) * p.v_stride, p.v_pool, slot, e);
}

}  // namespace

cudaError_t LaunchKvAppend(const KvAppendParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_tokens < 0 || p.k == nullptr || p.slots == nullptr || p.k_pool.base == nullptr ||
      p.k_pool.rows_per_page <= 0 || p.k_pool.head_dim <= 0 || p.k_pool.num_kv_heads <= 0) {
    return cudaErrorInvalidValue;
  }
  if (p.v != nullptr && (p.v_pool.base == nullptr || p.v_pool.head_dim <= 0 ||
                         p.v_pool.rows_per_page != p.k_pool.rows_per_page ||
                         p.v_pool.num_kv_heads != p.k_pool.num_kv_heads)) {
    return cudaErrorInvalidValue;
  }
  int elems = p.k_pool.num_kv_heads * p.k_pool.head_dim;
  if (p.v != nullptr) elems = max(elems, p.v_pool.num_kv_heads * p.v_pool.head_dim);
  const dim3 grid(p.num_tokens, (elems + kThreads - 1) / kThreads);
  if (grid.y > 65535) return cudaErrorInvalidValue;
  KvAppendKernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace needle::kernels
