// Dense paged causal attention: the kernels and launchers declared in kernels/dense_attention.h.
// Three paths:
// - single kernel (decode without a workspace, and prefill chunks of shapes the prefill path does
//   not instantiate): one thread block per (query token, KV head) attends the G heads of the group
//   over rows 0..t with detail::AttendHeads;
// - tensor-core prefill (prefill chunks, d_k/d_v 192/128, 128/128, 64/64): DensePrefillKernel, one
//   thread block per (64 (token, head) rows of a sequence, KV head), FlashAttention-2 style;
// - split-KV decode: DensePartialKernel cuts rows 0..t of each (sequence, KV head) into splits of
//   64-row chunks, one thread block each (kernels/split_kv_attention.cuh: GQA-packed tensor-core
//   tiles; chunks copied as tensor-map boxes where the pool allows, else by cp.async), and
//   DenseMergeKernel merges the splits' softmax states per query head
//   (several heads of a pair per CTA when there are many pairs).
#include "kernels/dense_attention.h"

#include <cstdint>

#include "kernels/attention_common.cuh"
#include "kernels/split_kv_attention.cuh"

namespace needle::kernels {
namespace {

namespace sk = detail::splitkv;

struct DenseSplitPlan {
  int cps = 1;          // chunks per split
  int splits = 0;       // splits per (sequence, KV head)
  int merge_heads = 1;  // query heads per merge CTA (splitkv::MergeHeadsPerCta)
  size_t acc_offset = 0, bytes = 0;
};

struct DenseSplitArgs {
  DenseAttentionParams p;
  DenseSplitPlan plan;
  sk::PartialStates states;
  sk::CacheBoxMaps maps;  // the tensor-map instantiation's K/V maps (sk::MakeCacheBoxMaps)
};

// kBoxes: every chunk (64 rows at a multiple of 64, inside one page) arrives as tensor-map boxes
// (sk::TmaRows), else by 16-byte cp.async.
template <int DK, int DV, bool kBoxes>
__global__ void __launch_bounds__(sk::kThreads, 2) DensePartialKernel(const __grid_constant__ DenseSplitArgs a) {
  extern __shared__ __align__(1024) char smem[];
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
  auto attend = [&](const auto& tma) {
    sk::AttendChunks<DK, DV>(p.q + head0 * DK, G, p.softmax_scale * sk::kLog2e,
                             detail::PagedRows(p.kv, seq, kv_head, DK, DV), count, chunk_of,
                             [](int64_t f) { return f; }, smem, sk::ScoreSink{}, [](int, const sk::ChunkRange&) {},
                             ps.ml + ps.Index(pair, split), ps.acc + ps.Index(pair, split) * DV, tma);
  };
  if constexpr (kBoxes) {
    attend(sk::PagedBoxRows(p.kv, a.maps, seq, kv_head));
  } else {
    attend(sk::NoTma{});
  }
}

__global__ void __launch_bounds__(sk::kMergeThreads) DenseMergeKernel(const DenseSplitArgs a) {
  __shared__ float gate[sk::kMergeMaxHeads];
  detail::WaitForPrerequisiteGrids();
  const DenseAttentionParams& p = a.p;
  const int G = p.num_heads / p.num_kv_heads, heads = a.plan.merge_heads, per_pair = G / heads;
  const int pair = blockIdx.x / per_pair, h0 = (blockIdx.x % per_pair) * heads;
  const int seq = pair / p.num_kv_heads, kv_head = pair % p.num_kv_heads;
  __nv_bfloat16* out =
      p.out + (static_cast<int64_t>(seq) * p.num_heads + static_cast<int64_t>(kv_head) * G + h0) * p.head_dim_v;
  if (p.start_pos[seq] >= p.max_context) {
    for (int c = threadIdx.x; c < heads * p.head_dim_v; c += blockDim.x) out[c] = __float2bfloat16(NAN);
    return;
  }
  if (static_cast<int>(threadIdx.x) < heads) gate[threadIdx.x] = 1.0f;
  const int begin[2] = {0, a.plan.splits};
  sk::MergeBranches<1>(a.states, pair, h0, heads, begin, gate, out);
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

// ---- Tensor-core prefill (FlashAttention-2 style) ----------------------------------------------
//
// A CTA (4 warps) owns one tile of kRows = 64 rows of one sequence's chunk and one KV head: rows are
// (query token, head of the group) pairs, tile row r = token r / G, head r % G, so a tile holds
// tpt = 64 / G tokens (G 16: 4 tokens; G 1: 64; G 64: one). Warp w owns tile rows 16w..16w+15 for
// the whole key range (no cross-warp merge). The CTA walks keys 0..(its last token's position) in
// 64-row chunks from the paged cache, two chunks in flight (IssueChunk: page-table lookup per row,
// 16-byte cp.async); per chunk each warp computes its 16x64 scores, one online-softmax update in
// fp32 (log2 domain) and P.V on bf16 tensor cores (ComputeChunkRows; P as bf16 hi + lo, or plain
// bf16 with params.prefill_p_bf16). Chunks that end at or before the tile's first position skip the
// causal mask.
//
// Tiles of sequence s are numbered base(s) .. base(s) + ceil(len_s / tpt) - 1 with
// base(s) = cu_tokens[s] / tpt + s: increasing in s, disjoint, and at most
// num_tokens / tpt + num_seqs in all, so the grid is sized on the host without reading cu_tokens; a
// CTA finds its sequence by binary search and exits when its tile is past the sequence's chunk.
// The KV head is the fastest grid index, and tiles run from the last one down (later tokens of a
// sequence have more keys: the long CTAs start first).
constexpr int kPrefillTileRows = sk::kRows;

__host__ __device__ inline int PrefillTokensPerTile(int G) { return G >= kPrefillTileRows ? 1 : kPrefillTileRows / G; }

// Resident CTAs per SM the register budget is cut for: shared memory allows 2 (d_k 192: 88 KB per
// CTA), 3 (d 128: 71 KB) and 6 (d 64: 37 KB).
constexpr int PrefillMinBlocks(int dk) { return dk <= 64 ? 4 : dk <= 128 ? 3 : 2; }

template <int DK, int DV, bool kSplitP>
__global__ void __launch_bounds__(sk::kThreads, PrefillMinBlocks(DK))
    DensePrefillKernel(const DenseAttentionParams p, int tpt) {
  extern __shared__ __align__(16) char smem[];
  const int warp = threadIdx.x / detail::kWarpSize, lane = threadIdx.x % detail::kWarpSize;
  const int G = p.num_heads / p.num_kv_heads;
  const int kv_head = blockIdx.x % p.num_kv_heads;
  const int tile = static_cast<int>(gridDim.x / p.num_kv_heads) - 1 - static_cast<int>(blockIdx.x / p.num_kv_heads);
  int lo = 0, hi = p.num_seqs - 1;  // the largest s with base(s) <= tile
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.cu_tokens[mid] / tpt + mid <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int seq = lo;
  const int first = p.cu_tokens[seq] + (tile - (p.cu_tokens[seq] / tpt + seq)) * tpt;  // packed token index
  const int ntok = min(tpt, p.cu_tokens[seq + 1] - first);
  if (ntok <= 0) return;  // uniform over the CTA
  const int64_t pos0 = static_cast<int64_t>(p.start_pos[seq]) + (first - p.cu_tokens[seq]);
  const int64_t keys = detail::MaxI64(0, pos0 + ntok);  // keys 0..keys-1
  const int chunks = static_cast<int>((keys + sk::kRows - 1) / sk::kRows);
  const int valid_rows = ntok * G;
  const bool active = warp * 16 < valid_rows;
  const int64_t head0 = static_cast<int64_t>(first) * p.num_heads + static_cast<int64_t>(kv_head) * G;
  const int H = p.num_heads;
  // Tile row r -> its element offset in q/out rows ([token][H] heads), or -1 when absent.
  auto row_index = [=](int r) -> int64_t {
    return r < valid_rows ? head0 + static_cast<int64_t>(r / G) * H + (r % G) : -1;
  };
  const detail::RowSource src = detail::PagedRows(p.kv, seq, kv_head, DK, DV);
  auto chunk_of = [=](int c) {
    const int64_t b = static_cast<int64_t>(c) * sk::kRows;
    return sk::ChunkRange{b, b, detail::MinI64(keys, b + sk::kRows)};
  };
  auto identity = [](int64_t f) { return f; };
  for (int c = 0; c < chunks && c < sk::kStages; ++c) sk::IssueChunk<DK, DV>(smem, c, src, identity, chunk_of(c));

  sk::WarpState<DV> st;
#pragma unroll
  for (int n = 0; n < DV / 8; ++n) st.o[n][0] = st.o[n][1] = st.o[n][2] = st.o[n][3] = 0.0f;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.0f;
  uint32_t qf[DK / 16][4];
  sk::LoadQueryFragmentRows<DK>(
      [&](int r) -> const detail::bf16* {
        const int64_t i = row_index(r);
        return i < 0 ? nullptr : p.q + i * DK;
      },
      warp, lane, qf);
  // Positions of the lane's two tile rows (rows lane/4 and lane/4 + 8 of the warp's 16); an absent
  // row gets -1 (attends nothing).
  int64_t row_pos[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + lane / 4 + 8 * i;
    row_pos[i] = r < valid_rows ? pos0 + r / G : -1;
  }
  const float scale_log2 = p.softmax_scale * sk::kLog2e;
  // Two barriers per chunk: chunk c + 2's row addresses go to the table slot of stage c % kStages
  // (last read when chunk c was issued, two barriers ago) before chunk c is computed, so that the
  // barrier after the computation also publishes them (IssueChunk would add a third).
  for (int c = 0; c < chunks; ++c) {
    const sk::ChunkRange r = chunk_of(c);
    if (c + 1 < chunks) {
      detail::CpAsyncWait<1>();
    } else {
      detail::CpAsyncWait<0>();
    }
    __syncthreads();
    if (c + sk::kStages < chunks) {
      sk::StageRowPointers<DK, DV>(smem, c % sk::kStages, src, identity, chunk_of(c + sk::kStages));
    }
    if (active) {
      const int rows = static_cast<int>(r.end - r.score_begin);
      const bool masked = r.score_begin + sk::kRows - 1 > pos0;
      int col_end[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        col_end[i] = static_cast<int>(detail::MaxI64(0, detail::MinI64(rows, row_pos[i] - r.score_begin + 1)));
      }
      sk::ComputeChunkRows<DK, DV, kSplitP>(smem, c % sk::kStages, qf, rows, masked, col_end, scale_log2, st);
    }
    __syncthreads();  // stage c % kStages is free; its row addresses for chunk c + 2 are visible
    if (c + sk::kStages < chunks) sk::CopyChunk<DK, DV>(smem, c % sk::kStages, src, chunk_of(c + sk::kStages));
  }
  if (!active) return;
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    st.l[i] += __shfl_xor_sync(0xffffffffu, st.l[i], 1);
    st.l[i] += __shfl_xor_sync(0xffffffffu, st.l[i], 2);
    inv[i] = st.l[i] > 0.0f ? 1.0f / st.l[i] : 0.0f;  // no keys (negative start_pos): zeros, as the simple kernel
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t idx = row_index(warp * 16 + lane / 4 + 8 * i);
    if (idx < 0) continue;
    detail::bf16* out = p.out + idx * DV + 2 * (lane % 4);
#pragma unroll
    for (int n = 0; n < DV / 8; ++n) {
      *reinterpret_cast<uint32_t*>(out + n * 8) =
          detail::PackBf16(st.o[n][2 * i] * inv[i], st.o[n][2 * i + 1] * inv[i]);
    }
  }
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
  DenseSplitArgs a;
  const bool boxes = !p.cp_async_copies &&
                     sk::MakeCacheBoxMaps(p.kv, p.num_kv_heads, DK, DV, &a.maps);
  auto partial = boxes ? DensePartialKernel<DK, DV, true> : DensePartialKernel<DK, DV, false>;
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
  plan.merge_heads = sk::MergeHeadsPerCta(G, DV, plan.splits);
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
  return sk::LaunchWithPdl(DenseMergeKernel, dim3(static_cast<unsigned>(pairs * (G / plan.merge_heads))),
                           dim3(sk::kMergeThreads), 0, stream, a);
}

template <int DK, int DV>
cudaError_t LaunchDensePrefill(const DenseAttentionParams& p, cudaStream_t stream) {
  const int G = p.num_heads / p.num_kv_heads;
  const int tpt = PrefillTokensPerTile(G);
  const int64_t tiles = static_cast<int64_t>(p.num_tokens) / tpt + p.num_seqs;
  const int64_t blocks = tiles * p.num_kv_heads;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  auto kernel = p.prefill_p_bf16 ? DensePrefillKernel<DK, DV, false> : DensePrefillKernel<DK, DV, true>;
  const size_t smem = sk::Tile<DK, DV>::kAuxOffset;
  const cudaError_t e = detail::AllowDynamicSmem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<dim3(static_cast<unsigned>(blocks)), sk::kThreads, smem, stream>>>(p, tpt);
  return cudaGetLastError();
}

}  // namespace

bool DenseAttentionPrefillSupported(int head_dim_qk, int head_dim_v, int group_size) {
  return DenseAttentionSplitKvSupported(head_dim_qk, head_dim_v, group_size);
}

bool DenseAttentionSplitKvSupported(int head_dim_qk, int head_dim_v, int group_size) {
  if (!DenseAttentionSupported(head_dim_qk, head_dim_v, group_size)) return false;
  return DispatchSplitKvHeadDims(head_dim_qk, head_dim_v, [](auto) { return cudaSuccess; }) == cudaSuccess;
}

bool DenseAttentionSplitKvCopiesBoxes(const DenseAttentionParams& p) {
  if (!SplitKvShape(p) || p.cp_async_copies) return false;
  sk::CacheBoxMaps maps;
  return DispatchSplitKvHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) {
           return sk::MakeCacheBoxMaps(p.kv, p.num_kv_heads, decltype(dims)::qk, decltype(dims)::v, &maps)
                      ? cudaSuccess
                      : cudaErrorNotSupported;
         }) == cudaSuccess;
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
  if (p.cu_tokens != nullptr && !p.simple_prefill &&
      DenseAttentionPrefillSupported(p.head_dim_qk, p.head_dim_v, p.num_heads / p.num_kv_heads)) {
    return DispatchSplitKvHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) {
      return LaunchDensePrefill<decltype(dims)::qk, decltype(dims)::v>(p, stream);
    });
  }
  return detail::DispatchHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) -> cudaError_t {
    constexpr int kDk = decltype(dims)::qk, kDv = decltype(dims)::v;
    DenseAttentionKernel<kDk, kDv><<<dim3(p.num_tokens, p.num_kv_heads), detail::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace needle::kernels
