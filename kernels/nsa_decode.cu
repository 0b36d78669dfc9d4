// NSA decode: the kernel and launcher declared in kernels/nsa_decode.h. One thread block per
// (sequence, KV head) runs detail::NsaGroupAttention for the sequence's single query token; the G
// heads of the group share the block. Nothing is split across blocks yet (the compressed branch is
// the part to split once this is tuned).
#include "kernels/nsa_decode.h"

#include "kernels/attention_common.cuh"

namespace needle::kernels {
namespace {

template <int DK, int DV>
__global__ void __launch_bounds__(detail::kThreads) NsaDecodeKernel(const NsaDecodeParams p, int max_blocks) {
  extern __shared__ __align__(16) char smem[];
  __shared__ detail::MergeScratch<DV> scratch;
  const int seq = blockIdx.x, kv_head = blockIdx.y;
  const int G = p.num_heads / p.num_kv_heads;
  const int64_t head0 = static_cast<int64_t>(seq) * p.num_heads + static_cast<int64_t>(kv_head) * G;

  detail::NsaQueryGroup qg;
  qg.q = p.q + head0 * DK;
  qg.gates = detail::GatesAt(p.gates, p.gate_dtype, head0);
  qg.gate_dtype = p.gate_dtype;
  qg.out = p.out + head0 * DV;
  qg.selected = p.selected_blocks == nullptr
                    ? nullptr
                    : p.selected_blocks + (static_cast<int64_t>(seq) * p.num_kv_heads + kv_head) *
                                              p.geometry.num_selected;
  qg.t = p.positions[seq];
  qg.G = G;
  qg.scale = p.softmax_scale;
  qg.cmp = detail::PagedRows(p.compressed, seq, kv_head, DK, DV);
  qg.sel = detail::PagedRows(p.selection, seq, kv_head, DK, DV);
  qg.win = p.shared_kv ? qg.sel : detail::PagedRows(p.window, seq, kv_head, DK, DV);
  detail::NsaGroupAttention<DK, DV>(qg, p.geometry, max_blocks, smem, scratch);
}

bool ParamsValid(const NsaDecodeParams& p) {
  if (p.num_seqs < 0 || p.num_heads < 1 || p.num_kv_heads < 1 || p.num_heads % p.num_kv_heads != 0) return false;
  if (p.num_kv_heads > 65535) return false;
  if (!NsaDecodeSupported(p.head_dim_qk, p.head_dim_v, p.num_heads / p.num_kv_heads)) return false;
  if (!detail::NsaGeometryValid(p.geometry) || p.max_context < 1) return false;
  if (p.q == nullptr || p.gates == nullptr || p.out == nullptr || p.positions == nullptr) return false;
  if (!detail::CacheValid(p.compressed) || !detail::CacheValid(p.selection)) return false;
  if (!p.shared_kv && p.geometry.window > 0 && !detail::CacheValid(p.window)) return false;
  return true;
}

}  // namespace

bool NsaDecodeSupported(int head_dim_qk, int head_dim_v, int group_size) {
  return detail::AttentionSupported(head_dim_qk, head_dim_v, group_size);
}

size_t NsaDecodeWorkspaceBytes(int num_seqs, int num_kv_heads, int group_size, int max_context) { return 0; }

cudaError_t LaunchNsaDecode(const NsaDecodeParams& p, void* workspace, cudaStream_t stream) {
  if (!ParamsValid(p)) return cudaErrorInvalidValue;
  if (p.num_seqs == 0) return cudaSuccess;
  return detail::DispatchHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) -> cudaError_t {
    constexpr int kDk = decltype(dims)::qk, kDv = decltype(dims)::v;
    const int G = p.num_heads / p.num_kv_heads;
    const int max_blocks = detail::NsaMaxBlocks(p.max_context, p.geometry.sel_block);
    const size_t smem = detail::NsaSmemBytes(G, kDv, max_blocks, p.geometry.num_selected);
    if (smem + sizeof(detail::MergeScratch<kDv>) + 1024 > detail::kMaxSmemBytes) return cudaErrorInvalidValue;
    auto kernel = NsaDecodeKernel<kDk, kDv>;
    cudaError_t e = detail::AllowDynamicSmem(kernel, smem);
    if (e != cudaSuccess) return e;
    kernel<<<dim3(p.num_seqs, p.num_kv_heads), detail::kThreads, smem, stream>>>(p, max_blocks);
    return cudaGetLastError();
  });
}

}  // namespace needle::kernels
