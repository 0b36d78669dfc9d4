// NSA prefill: the kernels and launcher declared in kernels/nsa_prefill.h. The tensor-core path
// (kernels/nsa_prefill_tc.cuh) runs where it applies; otherwise one thread block per (query token,
// KV head) runs detail::NsaGroupAttention; the window rows of the chunk come from the
// chunk buffers (rows window_{k,v}_chunk_stride apart) when the window is a ring (see the header's
// contract). The launcher resolves a 0 stride to contiguous rows before either kernel sees it.
#include "kernels/nsa_prefill.h"

#include "kernels/attention_common.cuh"
#include "kernels/nsa_prefill_tc.cuh"

namespace needle::kernels {
namespace {

template <int DK, int DV>
__global__ void __launch_bounds__(detail::kThreads) NsaPrefillKernel(const NsaPrefillParams p, int max_blocks) {
  extern __shared__ __align__(16) char smem[];
  __shared__ detail::MergeScratch<DV> scratch;
  const int token = blockIdx.x, kv_head = blockIdx.y;
  const int seq = detail::FindSequence(p.cu_tokens, p.num_seqs, token);
  const int G = p.num_heads / p.num_kv_heads;
  const int64_t head0 = static_cast<int64_t>(token) * p.num_heads + static_cast<int64_t>(kv_head) * G;
  const int64_t start = p.start_pos[seq];

  detail::NsaQueryGroup qg;
  qg.q = p.q + head0 * DK;
  qg.gates = detail::GatesAt(p.gates, p.gate_dtype, head0);
  qg.gate_dtype = p.gate_dtype;
  qg.out = p.out + head0 * DV;
  qg.selected = p.selected_blocks == nullptr
                    ? nullptr
                    : p.selected_blocks + (static_cast<int64_t>(token) * p.num_kv_heads + kv_head) *
                                              p.geometry.num_selected;
  qg.t = start + (token - p.cu_tokens[seq]);
  qg.G = G;
  qg.scale = p.softmax_scale;
  qg.cmp = detail::PagedRows(p.compressed, seq, kv_head, DK, DV);
  qg.sel = detail::PagedRows(p.selection, seq, kv_head, DK, DV);
  if (p.shared_kv) {
    qg.win = qg.sel;
  } else {
    qg.win = detail::PagedRows(p.window, seq, kv_head, DK, DV);
    const int64_t first = p.cu_tokens[seq];
    qg.win.k_tail = p.window_k_chunk + first * p.window_k_chunk_stride + static_cast<int64_t>(kv_head) * DK;
    qg.win.v_tail = p.window_v_chunk + first * p.window_v_chunk_stride + static_cast<int64_t>(kv_head) * DV;
    qg.win.k_tail_stride = p.window_k_chunk_stride;
    qg.win.v_tail_stride = p.window_v_chunk_stride;
    qg.win.tail_start = start;
  }
  detail::NsaGroupAttention<DK, DV>(qg, p.geometry, max_blocks, smem, scratch);
}

bool ParamsValid(const NsaPrefillParams& p) {
  if (p.num_seqs < 0 || p.num_tokens < 0 || p.num_heads < 1 || p.num_kv_heads < 1) return false;
  if (p.num_heads % p.num_kv_heads != 0 || p.num_kv_heads > 65535) return false;
  if (p.num_tokens > 0 && p.num_seqs < 1) return false;
  if (!NsaPrefillSupported(p.head_dim_qk, p.head_dim_v, p.num_heads / p.num_kv_heads)) return false;
  if (!detail::NsaGeometryValid(p.geometry) || p.max_context < 1) return false;
  if (p.q == nullptr || p.gates == nullptr || p.out == nullptr || p.cu_tokens == nullptr || p.start_pos == nullptr) {
    return false;
  }
  if (!detail::CacheValid(p.compressed) || !detail::CacheValid(p.selection)) return false;
  if (!p.shared_kv && p.geometry.window > 0 &&
      (!detail::CacheValid(p.window) || p.window_k_chunk == nullptr || p.window_v_chunk == nullptr)) {
    return false;
  }
  // A chunk row stride is 0 (contiguous) or at least a row.
  auto stride_ok = [&](int64_t stride, int head_dim) {
    return stride == 0 || stride >= static_cast<int64_t>(p.num_kv_heads) * head_dim;
  };
  if (!stride_ok(p.window_k_chunk_stride, p.head_dim_qk) || !stride_ok(p.window_v_chunk_stride, p.head_dim_v)) {
    return false;
  }
  return true;
}

// params with the window chunk strides resolved (0: contiguous rows).
NsaPrefillParams Resolved(const NsaPrefillParams& params) {
  NsaPrefillParams p = params;
  if (p.window_k_chunk_stride == 0) p.window_k_chunk_stride = static_cast<int64_t>(p.num_kv_heads) * p.head_dim_qk;
  if (p.window_v_chunk_stride == 0) p.window_v_chunk_stride = static_cast<int64_t>(p.num_kv_heads) * p.head_dim_v;
  return p;
}

}  // namespace

bool NsaPrefillSupported(int head_dim_qk, int head_dim_v, int group_size) {
  return detail::AttentionSupported(head_dim_qk, head_dim_v, group_size);
}

size_t NsaPrefillWorkspaceBytes(int num_tokens, int num_kv_heads, int group_size, int max_context) { return 0; }

bool NsaPrefillUsesTensorCores(const NsaPrefillParams& params) {
  if (!ParamsValid(params) || params.simple) return false;
  const NsaPrefillParams p = Resolved(params);
  return detail::nsa_prefill_tc::Supported(p.head_dim_qk, p.head_dim_v) && detail::nsa_prefill_tc::Applies(p);
}

cudaError_t LaunchNsaPrefill(const NsaPrefillParams& params, void* workspace, cudaStream_t stream) {
  if (!ParamsValid(params)) return cudaErrorInvalidValue;
  if (params.num_tokens == 0) return cudaSuccess;
  const NsaPrefillParams p = Resolved(params);
  if (!p.simple && detail::nsa_prefill_tc::Supported(p.head_dim_qk, p.head_dim_v)) {
    const cudaError_t e = detail::nsa_prefill_tc::Launch(p, stream);
    if (e != cudaErrorNotSupported) return e;
  }
  return detail::DispatchHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) -> cudaError_t {
    constexpr int kDk = decltype(dims)::qk, kDv = decltype(dims)::v;
    const int G = p.num_heads / p.num_kv_heads;
    const int max_blocks = detail::NsaMaxBlocks(p.max_context, p.geometry.sel_block);
    const size_t smem = detail::NsaSmemBytes(G, kDv, max_blocks, p.geometry.num_selected);
    if (smem + sizeof(detail::MergeScratch<kDv>) + 1024 > detail::kMaxSmemBytes) return cudaErrorInvalidValue;
    auto kernel = NsaPrefillKernel<kDk, kDv>;
    cudaError_t e = detail::AllowDynamicSmem(kernel, smem);
    if (e != cudaSuccess) return e;
    kernel<<<dim3(p.num_tokens, p.num_kv_heads), detail::kThreads, smem, stream>>>(p, max_blocks);
    return cudaGetLastError();
  });
}

}  // namespace needle::kernels
