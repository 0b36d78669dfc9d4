// Dense paged causal attention: the kernels and launchers declared in kernels/dense_attention.h.
// Two paths:
// - single kernel (prefill chunks, and decode without a workspace): one thread block per (query
//   token, KV head) attends the G heads of the group over rows 0..t with detail::AttendHeads;
// - split-KV decode: DensePartialKernel cuts rows 0..t of each (sequence, KV head) into splits of
//   64-row chunks, one thread block each (kernels/split_kv_attention.cuh: GQA-packed tensor-core
//   tiles, cp.async pipeline), and DenseMergeKernel merges the splits' softmax states per query head.
#include "kernels/dense_attention.h"

#include <cstdint>

#include "kernels/attention_common.cuh"
#include "kernels/split_kv_attention.cuh"

namespace needle::kernels {
namespace {

namespace sk = detail::splitkv;

struct DenseSplitPlan {
  int cps = 1;     // chunks per split
  int splits = 0;  // splits per (sequence, KV head)
  size_t acc_offset = 0, bytes = 0;
};

struct DenseSplitArgs {
  DenseAttentionParams p;
  DenseSplitPlan plan;
  sk::PartialStates states;
};

template <int DK, int DV>
__global__ void __launch_bounds__(sk::kThreads, 2) DensePartialKernel(const DenseSplitArgs a) {
  extern __shared__ __align__(16) char smem[];
  detail::WaitForPrerequisiteGrids();
  detail::AllowDependentLaunch();
  const DenseAttentionParams& p = a.p;
  const int pairs = p.num_seqs * p.num_kv_heads;
  const int pair = blockIdx.x % pairs, split = blockIdx.x / pairs;
  const int seq = pair / p.num_kv_heads, kv_head = pair % p.num_kv_heads;
  const int G = p.num_heads / p.num_kv_heads;
  const int64_t t = p.start_pos[seq];
  const int64_t rows = t >= 0 && t < p.max_context ? t + 1 : 0;
  const int chunks = static_cast<int>((rows + sk::kRows - 1) / sk::kRows);
  const int c0 = split * a.plan.cps;
  const int count = max(0, min(c0 + a.plan.cps, chunks) - c0);
  auto chunk_of = [=](int c) {
    const int64_t b = static_cast<int64_t>(c0 + c) * sk::kRows;
    return sk::ChunkRange{b, b, detail::MinI64(rows, b + sk::kRows)};
  };
  const int64_t head0 = static_cast<int64_t>(seq) * p.num_heads + static_cast<int64_t>(kv_head) * G;
  const sk::PartialStates& ps = a.states;
  sk::AttendChunks<DK, DV>(p.q + head0 * DK, G, p.softmax_scale * sk::kLog2e,
                           detail::PagedRows(p.kv, seq, kv_head, DK, DV), count, chunk_of,
                           [](int64_t f) { return f; }, smem, sk::ScoreSink{}, [](int, const sk::ChunkRange&) {},
                           ps.ml + ps.Index(pair, split), ps.acc + ps.Index(pair, split) * DV);
}

__global__ void __launch_bounds__(sk::kMergeThreads) DenseMergeKernel(const DenseSplitArgs a) {
  __shared__ float weights[sk::kMaxSplits];
  __shared__ __align__(16) float reduce[sk::kMergeThreads * 4];
  detail::WaitForPrerequisiteGrids();
  const DenseAttentionParams& p = a.p;
  const int G = p.num_heads / p.num_kv_heads;
  const int pair = blockIdx.x / G, h = blockIdx.x % G;
  const int seq = pair / p.num_kv_heads, kv_head = pair % p.num_kv_heads;
  __nv_bfloat16* out =
      p.out + (static_cast<int64_t>(seq) * p.num_heads + static_cast<int64_t>(kv_head) * G + h) * p.head_dim_v;
  if (p.start_pos[seq] >= p.max_context) {
    for (int c = threadIdx.x; c < p.head_dim_v; c += blockDim.x) out[c] = __float2bfloat16(NAN);
    return;
  }
  const int begin[2] = {0, a.plan.splits};
  const float gate[1] = {1.0f};
  sk::MergeBranches<1>(a.states, pair, h, begin, gate, weights, reduce, out);
}

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

template <class F>
cudaError_t DispatchSplitKvHeadDims(int dk, int dv, F&& f) {
  switch (detail::HeadDimsKey(dk, dv)) {
    case detail::HeadDimsKey(192, 128): return f(detail::HeadDims<192, 128>{});
    case detail::HeadDimsKey(128, 128): return f(detail::HeadDims<128, 128>{});
    case detail::HeadDimsKey(64, 64): return f(detail::HeadDims<64, 64>{});
    default: return cudaErrorInvalidValue;
  }
}

bool SplitKvShape(const DenseAttentionParams& p) {
  return p.cu_tokens == nullptr && p.max_context > 0 && p.chunks_per_split >= 0 && p.num_heads >= 1 &&
         p.num_kv_heads >= 1 && p.num_heads % p.num_kv_heads == 0 &&
         DenseAttentionSplitKvSupported(p.head_dim_qk, p.head_dim_v, p.num_heads / p.num_kv_heads);
}

// Plans the split-KV decode within `limit` bytes (splits made coarser until the workspace fits);
// *planned says whether it applies. With a workspace, also enqueues the two kernels.
template <int DK, int DV>
cudaError_t DenseSplitKv(const DenseAttentionParams& p, void* workspace, size_t limit, cudaStream_t stream,
                         size_t* bytes, bool* planned) {
  *planned = false;
  const int G = p.num_heads / p.num_kv_heads;
  const int64_t pairs = static_cast<int64_t>(p.num_seqs) * p.num_kv_heads;
  auto partial = DensePartialKernel<DK, DV>;
  const size_t smem = sk::Tile<DK, DV>::kAuxOffset;
  const int ctas = sk::CtasPerWave(partial, smem);
  if (ctas < 1) return cudaSuccess;
  const int chunks = sk::CeilDiv(p.max_context, sk::kRows);
  DenseSplitPlan plan;
  const int base = sk::ChunksPerSplitOneWave(chunks, pairs, ctas, p.chunks_per_split);
  for (int64_t coarsen = 1;; coarsen *= 2) {
    plan.cps = static_cast<int>(base * coarsen < chunks ? base * coarsen : chunks);
    plan.splits = sk::CeilDiv(chunks, plan.cps);
    const size_t states = static_cast<size_t>(pairs) * plan.splits * G;
    plan.acc_offset = sk::AlignUp(states * sizeof(float2));
    plan.bytes = plan.acc_offset + sk::AlignUp(states * DV * sizeof(float));
    if (plan.bytes <= limit) break;
    if (plan.splits <= 1) return cudaSuccess;
  }
  *bytes = plan.bytes;
  *planned = true;
  if (workspace == nullptr) return cudaSuccess;
  DenseSplitArgs a;
  a.p = p;
  a.plan = plan;
  a.states.ml = static_cast<float2*>(workspace);
  a.states.acc = reinterpret_cast<float*>(static_cast<char*>(workspace) + plan.acc_offset);
  a.states.slots = plan.splits;
  a.states.G = G;
  a.states.dv = DV;
  const cudaError_t e =
      sk::LaunchWithPdl(partial, dim3(static_cast<unsigned>(pairs * plan.splits)), dim3(sk::kThreads), smem, stream, a);
  if (e != cudaSuccess) return e;
  return sk::LaunchWithPdl(DenseMergeKernel, dim3(static_cast<unsigned>(pairs * G)), dim3(sk::kMergeThreads), 0, stream, a);
}

}  // namespace

bool DenseAttentionSplitKvSupported(int head_dim_qk, int head_dim_v, int group_size) {
  if (!DenseAttentionSupported(head_dim_qk, head_dim_v, group_size)) return false;
  return DispatchSplitKvHeadDims(head_dim_qk, head_dim_v, [](auto) { return cudaSuccess; }) == cudaSuccess;
}

size_t DenseAttentionSplitKvWorkspaceBytes(const DenseAttentionParams& p) {
  if (p.num_seqs <= 0 || !SplitKvShape(p)) return 0;  // an empty batch needs no scratch
  size_t bytes = 0;
  bool planned = false;
  DispatchSplitKvHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) {
    return DenseSplitKv<decltype(dims)::qk, decltype(dims)::v>(p, nullptr, SIZE_MAX, nullptr, &bytes, &planned);
  });
  return planned ? bytes : 0;
}

bool DenseAttentionSupported(int head_dim_qk, int head_dim_v, int group_size) {
  return detail::AttentionSupported(head_dim_qk, head_dim_v, group_size);
}

size_t DenseAttentionWorkspaceBytes(int num_tokens, int num_kv_heads, int group_size, int max_context) { return 0; }

cudaError_t LaunchDenseAttention(const DenseAttentionParams& p, void* workspace, cudaStream_t stream) {
  return LaunchDenseAttention(p, workspace, 0, stream);
}

cudaError_t LaunchDenseAttention(const DenseAttentionParams& p, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {
  if (!ParamsValid(p)) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  if (workspace != nullptr && workspace_bytes > 0 && SplitKvShape(p)) {
    size_t bytes = 0;
    bool planned = false;
    const cudaError_t e = DispatchSplitKvHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) {
      return DenseSplitKv<decltype(dims)::qk, decltype(dims)::v>(p, workspace, workspace_bytes, stream, &bytes,
                                                                 &planned);
    });
    if (planned || e != cudaSuccess) return e;
  }
  return detail::DispatchHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) -> cudaError_t {
    constexpr int kDk = decltype(dims)::qk, kDv = decltype(dims)::v;
    DenseAttentionKernel<kDk, kDv><<<dim3(p.num_tokens, p.num_kv_heads), detail::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace needle::kernels
