// Dense paged causal attention: the kernel and launcher declared in kernels/dense_attention.h. One
// thread block per (query token, KV head) attends the G heads of the group over rows 0..t with
// detail::AttendHeads (warps over heads and row splits, merged softmax states). No split across
// blocks yet: a long decode context is read by one block per KV head.
#include "kernels/dense_attention.h"

#include "kernels/attention_common.cuh"

namespace needle::kernels {
namespace {

template <int DK, int DV>
__global__ void __launch_bounds__(detail::kThreads) DenseAttentionKernel(const DenseAttentionParams p) {
  __shared__ detail::MergeScratch<DV> scratch;
  constexpr int kV = detail::LaneCols(DV);
  const int token = blockIdx.x, kv_head = blockIdx.y;
  const int seq = p.cu_tokens == nullptr ? token : detail::FindSequence(p.cu_tokens, p.num_seqs, token);
  const int64_t t = p.cu_tokens == nullptr ? p.start_pos[seq]
                                           : static_cast<int64_t>(p.start_pos[seq]) + (token - p.cu_tokens[seq]);
  const int G = p.num_heads / p.num_kv_heads;
  const int64_t head0 = static_cast<int64_t>(token) * p.num_heads + static_cast<int64_t>(kv_head) * G;
  __nv_bfloat16* out = p.out + head0 * DV;
  const detail::RowSource rows = detail::PagedRows(p.kv, seq, kv_head, DK, DV);
  detail::AttendHeads<DK, DV>(
      G, p.q + head0 * DK, p.softmax_scale, rows, t + 1 > 0 ? t + 1 : 0, [](int64_t f) { return f; }, scratch,
      [&](int h, int lane, const float* o, float) {
#pragma unroll
        for (int j = 0; j < kV; ++j) {
          const int c = lane + j * detail::kWarpSize;
          if (DV % detail::kWarpSize == 0 || c < DV) out[h * DV + c] = __float2bfloat16(o[j]);
        }
      });
}

bool ParamsValid(const DenseAttentionParams& p) {
  if (p.num_seqs < 0 || p.num_tokens < 0 || p.num_heads < 1 || p.num_kv_heads < 1) return false;
  if (p.num_heads % p.num_kv_heads != 0 || p.num_kv_heads > 65535) return false;
  if (p.cu_tokens == nullptr && p.num_tokens != p.num_seqs) return false;
  if (p.num_tokens > 0 && p.num_seqs < 1) return false;
  if (!DenseAttentionSupported(p.head_dim_qk, p.head_dim_v, p.num_heads / p.num_kv_heads)) return false;
  if (p.q == nullptr || p.out == nullptr || p.start_pos == nullptr) return false;
  if (!detail::CacheValid(p.kv) || p.kv.ring_pages != 0) return false;
  return true;
}

}  // namespace

bool DenseAttentionSupported(int head_dim_qk, int head_dim_v, int group_size) {
  return detail::AttentionSupported(head_dim_qk, head_dim_v, group_size);
}

size_t DenseAttentionWorkspaceBytes(int num_tokens, int num_kv_heads, int group_size, int max_context) { return 0; }

cudaError_t LaunchDenseAttention(const DenseAttentionParams& p, void* workspace, cudaStream_t stream) {
  if (!ParamsValid(p)) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  return detail::DispatchHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) -> cudaError_t {
    constexpr int kDk = decltype(dims)::qk, kDv = decltype(dims)::v;
    DenseAttentionKernel<kDk, kDv><<<dim3(p.num_tokens, p.num_kv_heads), detail::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace needle::kernels
