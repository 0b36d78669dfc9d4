// NSA decode: the kernels and launchers declared in kernels/nsa_decode.h. Two paths:
// - single kernel: one thread block per (sequence, KV head) runs detail::NsaGroupAttention for the
//   sequence's query token (no workspace; every supported head dim);
// - split-KV (kernels/nsa_decode_split.cuh): four kernels over many thread blocks per (sequence, KV
//   head), for the head dims instantiated below, when the caller passes a workspace.
#include "kernels/nsa_decode.h"

#include <cstdint>

#include "kernels/attention_common.cuh"
#include "kernels/nsa_decode_split.cuh"

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

bool ShapeValid(const NsaDecodeParams& p) {
  if (p.num_seqs < 0 || p.num_heads < 1 || p.num_kv_heads < 1 || p.num_heads % p.num_kv_heads != 0) return false;
  if (p.num_kv_heads > 65535) return false;
  if (!NsaDecodeSupported(p.head_dim_qk, p.head_dim_v, p.num_heads / p.num_kv_heads)) return false;
  if (!detail::NsaGeometryValid(p.geometry) || p.max_context < 1) return false;
  return p.chunks_per_split >= 0;
}

bool ParamsValid(const NsaDecodeParams& p) {
  if (!ShapeValid(p)) return false;
  if (p.q == nullptr || p.gates == nullptr || p.out == nullptr || p.positions == nullptr) return false;
  if (!detail::CacheValid(p.compressed) || !detail::CacheValid(p.selection)) return false;
  if (!p.shared_kv && p.geometry.window > 0 && !detail::CacheValid(p.window)) return false;
  return true;
}

// The split-KV path's head dims (one instantiation of each kernel per pair).
template <class F>
cudaError_t DispatchSplitKvHeadDims(int dk, int dv, F&& f) {
  switch (detail::HeadDimsKey(dk, dv)) {
    case detail::HeadDimsKey(192, 128): return f(detail::HeadDims<192, 128>{});
    case detail::HeadDimsKey(64, 64): return f(detail::HeadDims<64, 64>{});
    default: return cudaErrorInvalidValue;
  }
}

// Plans the split-KV path for p within `limit` workspace bytes; *bytes gets the plan's size and
// *planned whether the path applies. With a workspace, also enqueues its four kernels.
template <int DK, int DV>
cudaError_t NsaSplitKv(const NsaDecodeParams& p, void* workspace, size_t limit, cudaStream_t stream, size_t* bytes,
                       bool* planned) {
  namespace ns = detail::nsa_split;
  namespace sk = detail::splitkv;
  *planned = false;
  const int G = p.num_heads / p.num_kv_heads;
  auto partial = ns::NsaPartialKernel<DK, DV, ns::kPhaseCompressed, false>;
  const size_t partial_smem = ns::PartialSmemBytes<DK, DV>(G, p.geometry.num_selected, true);
  if (partial_smem > detail::kMaxSmemBytes) return cudaSuccess;
  ns::NsaSplitPlan plan;
  if (!ns::MakeNsaSplitPlan(p, DV, sk::CtasPerWave(partial, partial_smem), p.chunks_per_split, limit, &plan)) {
    return cudaSuccess;
  }
  const size_t select_smem = ns::SelectSmemBytes(plan.lb_stride, G);
  if (select_smem + 2048 > detail::kMaxSmemBytes) return cudaSuccess;
  *bytes = plan.bytes;
  *planned = true;
  if (workspace == nullptr) return cudaSuccess;

  const int pairs = p.num_seqs * p.num_kv_heads;
  plan.merge_heads = sk::MergeHeadsPerCta(G, DV, plan.Slots());
  ns::NsaSplitArgs a;
  a.p = p;
  a.plan = plan;
  char* ws = static_cast<char*>(workspace);
  a.states.ml = reinterpret_cast<float2*>(ws + plan.ml_offset);
  a.states.acc = reinterpret_cast<float*>(ws + plan.acc_offset);
  a.states.slots = plan.Slots();
  a.states.G = G;
  a.states.dv = DV;
  a.lb = plan.score ? reinterpret_cast<float*>(ws + plan.lb_offset) : nullptr;
  a.sel = reinterpret_cast<int32_t*>(ws + plan.sel_offset);
  ns::ChooseBoxes<DK, DV>(p, &a);
  auto compressed = a.cmp_boxes ? ns::NsaPartialKernel<DK, DV, ns::kPhaseCompressed, true> : partial;
  auto selected = a.sel_boxes ? ns::NsaPartialKernel<DK, DV, ns::kPhaseWindowSelected, true>
                              : ns::NsaPartialKernel<DK, DV, ns::kPhaseWindowSelected, false>;
  for (auto kernel : {compressed, selected}) {
    const cudaError_t e = detail::AllowDynamicSmem(kernel, partial_smem);
    if (e != cudaSuccess) return e;
  }
  cudaError_t e = detail::AllowDynamicSmem(ns::NsaSelectKernel, select_smem);
  if (e != cudaSuccess) return e;
  e = sk::LaunchWithPdl(compressed, dim3(pairs * plan.cmp_splits), dim3(sk::kThreads), partial_smem, stream, a);
  if (e != cudaSuccess) return e;
  e = sk::LaunchWithPdl(ns::NsaSelectKernel, dim3(pairs), dim3(ns::kSelectThreads), select_smem, stream, a);
  if (e != cudaSuccess) return e;
  e = sk::LaunchWithPdl(selected, dim3(pairs * plan.slc_splits), dim3(sk::kThreads), partial_smem, stream, a);
  if (e != cudaSuccess) return e;
  return sk::LaunchWithPdl(ns::NsaMergeKernel, dim3(pairs * (G / plan.merge_heads)), dim3(ns::kMergeThreads), 0, stream,
                           a);
}

cudaError_t LaunchSingleKernel(const NsaDecodeParams& p, cudaStream_t stream) {
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

}  // namespace

bool NsaDecodeSplitKvSupported(int head_dim_qk, int head_dim_v, int group_size) {
  if (!NsaDecodeSupported(head_dim_qk, head_dim_v, group_size)) return false;
  return DispatchSplitKvHeadDims(head_dim_qk, head_dim_v, [](auto) { return cudaSuccess; }) == cudaSuccess;
}

bool NsaDecodeSplitKvCopiesBoxes(const NsaDecodeParams& p, bool compressed_branch) {
  if (!ShapeValid(p) || !NsaDecodeSplitKvSupported(p.head_dim_qk, p.head_dim_v, p.num_heads / p.num_kv_heads)) {
    return false;
  }
  detail::nsa_split::NsaSplitArgs a;
  DispatchSplitKvHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) {
    detail::nsa_split::ChooseBoxes<decltype(dims)::qk, decltype(dims)::v>(p, &a);
    return cudaSuccess;
  });
  return compressed_branch ? a.cmp_boxes : a.sel_boxes;
}

size_t NsaDecodeSplitKvWorkspaceBytes(const NsaDecodeParams& p) {
  if (p.num_seqs <= 0 || !ShapeValid(p) || !NsaDecodeSplitKvSupported(p.head_dim_qk, p.head_dim_v, p.num_heads / p.num_kv_heads)) {
    return 0;
  }
  size_t bytes = 0;
  bool planned = false;
  DispatchSplitKvHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) {
    return NsaSplitKv<decltype(dims)::qk, decltype(dims)::v>(p, nullptr, SIZE_MAX, nullptr, &bytes, &planned);
  });
  return planned ? bytes : 0;
}

bool NsaDecodeSupported(int head_dim_qk, int head_dim_v, int group_size) {
  return detail::AttentionSupported(head_dim_qk, head_dim_v, group_size);
}

size_t NsaDecodeWorkspaceBytes(int num_seqs, int num_kv_heads, int group_size, int max_context) { return 0; }

cudaError_t LaunchNsaDecode(const NsaDecodeParams& p, void* workspace, cudaStream_t stream) {
  return LaunchNsaDecode(p, workspace, 0, stream);
}

cudaError_t LaunchNsaDecode(const NsaDecodeParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!ParamsValid(p)) return cudaErrorInvalidValue;
  if (p.num_seqs == 0) return cudaSuccess;
  if (workspace != nullptr && workspace_bytes > 0 &&
      NsaDecodeSplitKvSupported(p.head_dim_qk, p.head_dim_v, p.num_heads / p.num_kv_heads)) {
    size_t bytes = 0;
    bool planned = false;
    const cudaError_t e = DispatchSplitKvHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) {
      return NsaSplitKv<decltype(dims)::qk, decltype(dims)::v>(p, workspace, workspace_bytes, stream, &bytes,
                                                              &planned);
    });
    if (planned || e != cudaSuccess) return e;
  }
  return LaunchSingleKernel(p, stream);
}

}  // namespace needle::kernels
