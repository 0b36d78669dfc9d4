// NSA decode, split-KV path: the kernels and the host plan behind LaunchNsaDecode when the caller
// passes a workspace (kernels/nsa_decode.h). One decode step is four launches, chained with
// programmatic dependent launch so each one's start overlaps the previous one's tail:
//
//   1. NsaPartialKernel (compressed phase): CTAs over (sequence, KV head, run) attend a run of the
//      pair's compressed chunks (splitkv::AttendChunks; one wave of equal runs) and leave a partial
//      softmax state. Compressed chunks are cut at selection-block boundaries and also load the few
//      earlier compressed tokens that overlap their first block, so each chunk scores its blocks
//      completely: per head, the log2 of the block's unnormalised probability mass (lb) goes to the
//      workspace (for l = d = l' it is the score).
//   2. NsaSelectKernel: one CTA per (sequence, KV head) merges the compressed splits' (max, sum) into
//      each head's log-sum-exp, turns lb into normalised block scores summed over the G heads, forces
//      the fixed blocks, selects the top n (ties to the lower index; by a threshold and the ranks of
//      the few keys above it, or a radix select when many keys tie) and writes the ascending block
//      ids (workspace and, if asked, params.selected_blocks).
//   3. NsaPartialKernel (window + selected phase): CTAs over (sequence, KV head, split) first attend
//      their share of the window, which does not depend on the selection: they start (PDL) as soon as
//      the select kernel has passed its own wait, so the window is read while the select kernel runs
//      (one latency-bound CTA per pair, the memory system otherwise idle). Then they wait for the
//      selection and attend their share of the selected blocks' rows <= t. One state per branch.
//      (Where select CTAs fill an SM's registers, two per SM, the window CTAs start after them.)
//   4. NsaMergeKernel: one CTA per query head, or per several heads of a pair when there are many
//      pairs, merges each branch's partial states (log-sum-exp weights) and writes the gated sum: the
//      gate multiplies the merge weights, so the combine costs nothing extra.
//
// Everything the four kernels share about a launch is NsaSplitArgs (params, plan, workspace views).
// CUDA only; included by kernels/nsa_decode.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/attention_common.cuh"
#include "kernels/nsa_compressed_chunks.cuh"
#include "kernels/nsa_decode.h"
#include "kernels/split_kv_attention.cuh"

namespace needle::kernels::detail::nsa_split {

using nsa_chunks::CmpBlocksPerChunk;
using nsa_chunks::NumCompressed;
using splitkv::ChunkRange;
using splitkv::kRows;

constexpr int kPhaseCompressed = 0;
constexpr int kPhaseWindowSelected = 1;
constexpr int kSelectThreads = 512;  // a warp per head of G <= 16 in one round; 2 blocks per thread at 64k
using splitkv::kMergeThreads;

// How one launch is cut: chunks per split (cps) and splits per (sequence, KV head) of each branch,
// sized from max_context, and where each workspace array starts.
struct NsaSplitPlan {
  int blocks_per_chunk = 0;  // selection blocks per compressed-branch chunk
  int max_blocks = 0;        // selection blocks of a query at max_context - 1
  int lb_stride = 0;         // floats per (pair, head) row of lb: max_blocks rounded up to 4
  bool score = false;        // some query may have more blocks than n (block scores needed)
  // Kernel 1 cuts each pair's compressed chunks (sized for max_context) into cmp_splits runs of
  // cmp_cps chunks. Kernel 3 has slc_splits CTAs per pair; CTA s attends window chunks
  // [s win_cps, (s + 1) win_cps) when s < win_splits, then selected chunks [s slc_cps, (s + 1) slc_cps).
  // Slots: compressed run s is slot s, window share s slot cmp_splits + s, selected share s slot
  // cmp_splits + win_splits + s (empty states where a share has no rows).
  int cmp_chunks = 0, cmp_cps = 1, cmp_splits = 0;
  int win_cps = 1, win_splits = 0;
  int slc_cps = 1, slc_splits = 0;
  int merge_heads = 1;  // query heads per merge CTA (splitkv::MergeHeadsPerCta)
  size_t ml_offset = 0, acc_offset = 0, lb_offset = 0, sel_offset = 0, bytes = 0;

  __host__ __device__ int Slots() const { return cmp_splits + win_splits + slc_splits; }
};

struct NsaSplitArgs {
  NsaDecodeParams p;
  NsaSplitPlan plan;
  splitkv::PartialStates states;  // slots: compressed splits, then window, then selected
  float* lb = nullptr;            // [pairs][G][lb_stride] log2 block masses (when plan.score)
  int32_t* sel = nullptr;         // [pairs][num_selected] ascending block ids, -1 in unused slots
  // Tensor-map boxes (splitkv::TmaRows) for the selected blocks (whole 64-row chunks of the
  // selection pool when l' is a multiple of 64) and the compressed chunks (when every chunk starts
  // on a multiple of 64 compressed tokens: l = d = l'); cp.async otherwise.
  bool sel_boxes = false, cmp_boxes = false;
  splitkv::CacheBoxMaps sel_maps, cmp_maps;
};

// ---- Kernels 1 and 3 ------------------------------------------------------------------------------

template <int DK, int DV, bool kBoxes>
__device__ __forceinline__ void CompressedPhase(const NsaSplitArgs& a, char* smem, int pair, int item, int seq,
                                                int kv_head, int G, int64_t t, bool valid, const bf16* q,
                                                float scale_log2);

// One instantiation per (phase, copy path): kBoxes copies the phase's box-eligible chunks (the
// compressed chunks in phase 1, the selected blocks in phase 3; NsaSplitArgs) as tensor-map boxes.
template <int DK, int DV, int kPhase, bool kBoxes>
__global__ void __launch_bounds__(splitkv::kThreads, 2) NsaPartialKernel(const __grid_constant__ NsaSplitArgs a) {
  extern __shared__ __align__(1024) char smem[];
  using Tile = splitkv::Tile<DK, DV>;
  // The window + selected phase starts only once the select kernel has passed its own wait, so
  // everything before this step (queries, caches, positions) is complete; it waits just before
  // reading the selection. The compressed phase reads the step's inputs right away and waits first.
  if constexpr (kPhase != kPhaseWindowSelected) WaitForPrerequisiteGrids();
  AllowDependentLaunch();
  const NsaDecodeParams& p = a.p;
  const NsaSplitPlan& plan = a.plan;
  const NsaKernelGeometry& geo = p.geometry;
  const int pairs = p.num_seqs * p.num_kv_heads;
  const int pair = blockIdx.x % pairs, item = blockIdx.x / pairs;
  const int seq = pair / p.num_kv_heads, kv_head = pair % p.num_kv_heads;
  const int G = p.num_heads / p.num_kv_heads;
  const int64_t t = p.positions[seq];
  const bool valid = t >= 0 && t < p.max_context;
  const bf16* q = p.q + (static_cast<int64_t>(seq) * p.num_heads + static_cast<int64_t>(kv_head) * G) * DK;
  const float scale_log2 = p.softmax_scale * splitkv::kLog2e;
  char* aux = smem + Tile::kAuxOffset;
  const splitkv::PartialStates& ps = a.states;
  const int64_t lp = geo.sel_block;
  auto same_row = [](int64_t f) { return f; };
  auto no_scores = [](int, const ChunkRange&) {};

  if constexpr (kPhase == kPhaseWindowSelected) {
    // The queries are step inputs (complete, see above): loaded now, they are not one more round trip
    // after the wait for the selection.
    const splitkv::QueryFragments<DK> qf = splitkv::LoadGroupQuery<DK>(q, G);
    if (item < plan.win_splits) {
      const int slot = plan.cmp_splits + item;
      const int64_t begin = MaxI64(0, t - geo.window + 1);
      const int64_t rows = valid && geo.window > 0 ? t + 1 - begin : 0;
      const int chunks = static_cast<int>((rows + kRows - 1) / kRows);
      const int c0 = item * plan.win_cps;
      const int count = max(0, min(c0 + plan.win_cps, chunks) - c0);
      auto chunk_of = [=](int c) {
        const int64_t b = begin + static_cast<int64_t>(c0 + c) * kRows;
        return ChunkRange{b, b, MinI64(begin + rows, b + kRows)};
      };
      const RowSource src = PagedRows(p.shared_kv ? p.selection : p.window, seq, kv_head, DK, DV);
      splitkv::AttendChunks<DK, DV>(qf, G, scale_log2, src, count, chunk_of, same_row, smem, splitkv::ScoreSink{},
                                    no_scores, ps.ml + ps.Index(pair, slot), ps.acc + ps.Index(pair, slot) * DV);
    }
    const int slot = plan.cmp_splits + plan.win_splits + item;
    const int n = geo.num_selected;
    int32_t* sel = reinterpret_cast<int32_t*>(aux);
    WaitForPrerequisiteGrids();
    for (int i = threadIdx.x; i < n; i += splitkv::kThreads) sel[i] = valid ? a.sel[static_cast<int64_t>(pair) * n + i] : -1;
    __syncthreads();
    int ns = 0;
    while (ns < n && sel[ns] >= 0) ++ns;
    // Ascending ids: only the last block can be partial (the current one).
    const int64_t rows = ns == 0 ? 0 : (ns - 1) * lp + MinI64(lp, t + 1 - static_cast<int64_t>(sel[ns - 1]) * lp);
    const int chunks = static_cast<int>((rows + kRows - 1) / kRows);
    const int c0 = item * plan.slc_cps;
    const int count = max(0, min(c0 + plan.slc_cps, chunks) - c0);
    auto chunk_of = [=](int c) {
      const int64_t b = static_cast<int64_t>(c0 + c) * kRows;
      return ChunkRange{b, b, MinI64(rows, b + kRows)};
    };
    auto selected_row = [=](int64_t f) {  // 32-bit: f < n l'
      const int i = static_cast<int>(f), b = i / static_cast<int>(lp);
      return static_cast<int64_t>(sel[b]) * lp + (i - b * static_cast<int>(lp));
    };
    auto attend = [&](const auto& tma) {
      splitkv::AttendChunks<DK, DV>(qf, G, scale_log2, PagedRows(p.selection, seq, kv_head, DK, DV), count, chunk_of,
                                    selected_row, smem, splitkv::ScoreSink{}, no_scores, ps.ml + ps.Index(pair, slot),
                                    ps.acc + ps.Index(pair, slot) * DV, tma);
    };
    if constexpr (kBoxes) {
      attend(splitkv::PagedBoxRows(p.selection, a.sel_maps, seq, kv_head));
    } else {
      attend(splitkv::NoTma{});
    }
  } else {
    CompressedPhase<DK, DV, kBoxes>(a, smem, pair, item, seq, kv_head, G, t, valid, q, scale_log2);
  }
}

// Kernel 1's body: run `item` of the pair's compressed chunks.
template <int DK, int DV, bool kBoxes>
__device__ __forceinline__ void CompressedPhase(const NsaSplitArgs& a, char* smem, int pair, int item, int seq,
                                                int kv_head, int G, int64_t t, bool valid, const bf16* q,
                                                float scale_log2) {
  const NsaDecodeParams& p = a.p;
  const NsaSplitPlan& plan = a.plan;
  const NsaKernelGeometry& geo = p.geometry;
  char* aux = smem + splitkv::Tile<DK, DV>::kAuxOffset;
  const splitkv::PartialStates& ps = a.states;
  const int64_t lp = geo.sel_block;
  auto same_row = [](int64_t f) { return f; };
  const int slot = item;
  const int64_t nb = valid ? t / lp + 1 : 0;
  const int64_t nc = valid ? NumCompressed(geo, t) : 0;
  const int B = plan.blocks_per_chunk;
  const int chunks = static_cast<int>((nb + B - 1) / B);
  const int c0 = item * plan.cmp_cps;
  const int count = max(0, min(c0 + plan.cmp_cps, chunks) - c0);
  const nsa_chunks::TokenGrid grid = nsa_chunks::TokenGrid::Of(geo);
  auto chunk_of = [=](int c) {
    int ja, jb;
    return nsa_chunks::CompressedChunk(geo, grid, B, c0 + c, static_cast<int>(nb), static_cast<int>(nc), &ja, &jb);
  };
  const bool scoring = plan.score && nb > geo.num_selected && nc > 0;
  float* lb_pair = a.lb + static_cast<int64_t>(pair) * G * plan.lb_stride;
  splitkv::ScoreSink sink;
  // l = d = l' (FLA): compressed token j is block j and its mass is its own score, so the scores go
  // straight to lb; a block with no complete compressed token yet (the current one) gets -inf.
  const bool identity = geo.cmp_block == geo.cmp_stride && geo.cmp_stride == geo.sel_block;
  if (scoring && identity) {
    sink.rows = lb_pair;
    sink.row_stride = plan.lb_stride;
    const int64_t j_lo = MaxI64(nc, static_cast<int64_t>(c0) * B);
    const int64_t j_hi = MinI64(nb, static_cast<int64_t>(c0 + count) * B);
    for (int64_t i = threadIdx.x; i < (j_hi - j_lo) * G; i += splitkv::kThreads) {
      lb_pair[(i % G) * plan.lb_stride + j_lo + i / G] = -INFINITY;
    }
  } else if (scoring) {
    sink.tile = reinterpret_cast<float*>(aux);
  }
  float* tile = sink.tile;
  // lb[h][j] = log2 sum_i exp2(s_hi) |[i d, i d + l) ∩ [j l', (j+1) l')| / d over the chunk's tokens
  // overlapping block j, which are all of them (the chunk starts at its first block's first
  // overlapping token). Token and row indices fit in 32 bits (positions are int32).
  auto block_masses = [&](int c, const ChunkRange& r) {
    const int ja = (c0 + c) * B, jb = min(ja + B, static_cast<int>(nb));
    nsa_chunks::BlockMasses(geo, grid, G, tile, ja, jb - ja, r, lb_pair, plan.lb_stride);
  };
  auto attend = [&](const auto& tma) {
    splitkv::AttendChunks<DK, DV>(q, G, scale_log2, PagedRows(p.compressed, seq, kv_head, DK, DV), count, chunk_of,
                                  same_row, smem, sink, block_masses, ps.ml + ps.Index(pair, slot),
                                  ps.acc + ps.Index(pair, slot) * DV, tma);
  };
  if constexpr (kBoxes) {
    attend(splitkv::PagedBoxRows(p.compressed, a.cmp_maps, seq, kv_head));
  } else {
    attend(splitkv::NoTma{});
  }
}

// ---- Kernel 2 -------------------------------------------------------------------------------------

// Exclusive prefix sum of x over the block in thread order; *total receives the sum. Every thread of
// the kSelectThreads-thread block must call it.
__device__ inline int BlockExclusiveSum(int x, int* scratch, int* total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  int inclusive = x;
#pragma unroll
  for (int o = 1; o < kWarpSize; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += y;
  }
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kSelectThreads / kWarpSize; ++w) {
    const int v = scratch[w];
    if (w < warp) before += v;
    sum += v;
  }
  __syncthreads();
  *total = sum;
  return before + inclusive - x;
}

// Radix select over keys[lo, hi), 8 bits at a time from the top: *prefix gets the k-th largest key
// and *need how many keys equal to it are among the k largest (those with the lowest indices).
// k must be in [1, hi - lo]. Every thread of the kSelectThreads-thread block must call it.
__device__ inline void RadixSelect(const uint32_t* keys, int lo, int hi, int k, uint32_t* prefix_out, int* need_out) {
  // Two histograms: a pass counts into one while zeroing the other for the next pass (one barrier
  // fewer per pass).
  __shared__ __align__(16) int hist[2][256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_need;
  for (int b = threadIdx.x; b < 2 * 256; b += kSelectThreads) hist[b / 256][b % 256] = 0;
  __syncthreads();
  uint32_t prefix = 0;
  int need = k;
  for (int shift = 24, pass = 0; shift >= 0; shift -= 8, ++pass) {
    int* h = hist[pass & 1];
    const uint32_t high = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
    for (int j = lo + threadIdx.x; j < hi; j += kSelectThreads) {
      const uint32_t key = keys[j];
      if ((key & high) == prefix) atomicAdd(&h[(key >> shift) & 255u], 1);
    }
    for (int b = threadIdx.x; b < 256; b += kSelectThreads) hist[(pass + 1) & 1][b] = 0;
    __syncthreads();
    if (threadIdx.x < kWarpSize) {
      // Lane l owns digits 255 - 8 l down to 248 - 8 l: bins 8 (31 - l) .. 8 (31 - l) + 7, read as two
      // 16-byte loads and walked in registers.
      const int lane = threadIdx.x;
      const int4 below = *reinterpret_cast<const int4*>(h + 8 * (31 - lane));
      const int4 above4 = *reinterpret_cast<const int4*>(h + 8 * (31 - lane) + 4);
      const int cnt[8] = {above4.w, above4.z, above4.y, above4.x, below.w, below.z, below.y, below.x};
      int local = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) local += cnt[b];
      int inclusive = local;
#pragma unroll
      for (int o = 1; o < kWarpSize; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += y;
      }
      int above = inclusive - local;  // keys with a larger digit
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        if (above < need && above + cnt[b] >= need) {
          s_prefix = prefix | (static_cast<uint32_t>(255 - 8 * lane - b) << shift);
          s_need = need - above;
        }
        above += cnt[b];
      }
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
  }
  __syncthreads();  // s_prefix and s_need are read by every thread before a later call rewrites them
  *prefix_out = prefix;
  *need_out = need;
}

// Calls visit(j, chosen, rank) for each j in [lo, hi), ascending within each thread's own
// contiguous slice, where chosen says whether RadixSelect(prefix, need) chose keys[j] (keys above
// prefix, and the first `need` equal to it) and rank counts the chosen keys from 0 in block order.
// visit may rewrite keys[j] (only this thread reads it here). Every thread of the block must call it.
template <class Visit>
__device__ void ForEachKey(uint32_t* keys, int lo, int hi, uint32_t prefix, int need, int* scratch, Visit visit) {
  const int len = hi - lo, per = (len + kSelectThreads - 1) / kSelectThreads;
  const int j0 = lo + min(len, static_cast<int>(threadIdx.x) * per), j1 = min(hi, j0 + per);
  int equal = 0;
  for (int j = j0; j < j1; ++j) equal += keys[j] == prefix;
  int total = 0;
  const int equal_before = BlockExclusiveSum(equal, scratch, &total);
  int count = 0;
  for (int j = j0, r = equal_before; j < j1; ++j) {
    const uint32_t key = keys[j];
    if (key > prefix || (key == prefix && r++ < need)) ++count;
  }
  int pos = BlockExclusiveSum(count, scratch, &total);
  for (int j = j0, r = equal_before; j < j1; ++j) {
    const uint32_t key = keys[j];
    const bool chosen = key > prefix || (key == prefix && r++ < need);
    visit(j, chosen, chosen ? pos++ : -1);
  }
}

constexpr int kSelectWarps = kSelectThreads / kWarpSize;

// Shared memory of ThresholdTopN.
struct ThresholdScratch {
  uint64_t cand[kSelectThreads];  // candidate keys
  uint64_t warp_max[kSelectWarps];
  uint64_t tau;
  int count;
};

// The n <= kSelectWarps largest of keys[0, nb) (nb > n), ties to the lower block id, written in block
// order to ws_sel (and pub), when few keys come near them; false (on every thread, nothing written)
// when more than kSelectThreads do, for the radix select to handle. Block j's 64-bit key is its key
// above ~j: all distinct, and a tie goes to the lower id. The n-th largest of the warps' maxima (n
// distinct keys) is at most the n-th largest key, so the keys at or above it are candidates that
// include the answer; each candidate is ranked against the others. Four barriers and one pass over
// the keys (a radix select makes four passes with ~20 barriers); the candidates are a handful for real
// scores, and all blocks when every score ties. Every thread of the block must call it.
__device__ inline bool ThresholdTopN(const uint32_t* keys, int nb, int n, ThresholdScratch& s, int32_t* ws_sel,
                                     int32_t* pub) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  auto key = [&](int j) { return (static_cast<uint64_t>(keys[j]) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(j)); };
  uint64_t m = 0;  // below every key
  for (int j = threadIdx.x; j < nb; j += kSelectThreads) m = max(m, key(j));
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) s.warp_max[warp] = m;
  if (threadIdx.x == 0) s.count = 0;
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < kSelectWarps) {  // the n-th largest maximum
    const uint64_t x = s.warp_max[threadIdx.x];
    int position = 0;  // in descending order, equal maxima by warp
#pragma unroll
    for (int i = 0; i < kSelectWarps; ++i) {
      position += s.warp_max[i] > x || (s.warp_max[i] == x && i < static_cast<int>(threadIdx.x));
    }
    if (position == n - 1) s.tau = x;
  }
  __syncthreads();
  const uint64_t tau = s.tau;
  for (int j = threadIdx.x; j < nb; j += kSelectThreads) {
    const uint64_t k = key(j);
    if (k >= tau) {
      const int at = atomicAdd(&s.count, 1);
      if (at < kSelectThreads) s.cand[at] = k;
    }
  }
  __syncthreads();
  const int count = s.count;
  if (count > kSelectThreads) return false;
  // Candidate t's rank among the candidates; the n best go to slots 0..n-1 (their ids, in warp_max).
  int32_t* ids = reinterpret_cast<int32_t*>(s.warp_max);
  if (static_cast<int>(threadIdx.x) < count) {
    const uint64_t c = s.cand[threadIdx.x];
    int rank = 0;
    for (int i = 0; i < count; ++i) rank += s.cand[i] > c;
    if (rank < n) ids[rank] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(c));
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < n) {  // ascending ids
    const int32_t id = ids[threadIdx.x];
    int rank = 0;
    for (int i = 0; i < n; ++i) rank += ids[i] < id;
    ws_sel[rank] = id;
    if (pub != nullptr) pub[rank] = id;
  }
  return true;
}

// Dynamic shared memory: keys [max_blocks] u32, lse [G] f32.
__global__ void __launch_bounds__(kSelectThreads) NsaSelectKernel(const NsaSplitArgs a) {
  extern __shared__ __align__(16) char smem[];
  __shared__ int scratch[kSelectThreads / kWarpSize];
  __shared__ ThresholdScratch threshold;
  const NsaDecodeParams& p = a.p;
  const NsaKernelGeometry& geo = p.geometry;
  const int pair = blockIdx.x, seq = pair / p.num_kv_heads;
  const int G = p.num_heads / p.num_kv_heads, n = geo.num_selected;
  int32_t* ws_sel = a.sel + static_cast<int64_t>(pair) * n;
  int32_t* pub = p.selected_blocks == nullptr ? nullptr : p.selected_blocks + static_cast<int64_t>(pair) * n;
  const int64_t t = p.positions[seq];  // a step input: complete before this kernel could start
  const bool valid = t >= 0 && t < p.max_context;
  const int nb = valid ? static_cast<int>(t / geo.sel_block + 1) : 0;
  WaitForPrerequisiteGrids();
  AllowDependentLaunch();
  if (nb <= n) {  // every block (none for an invalid query)
    for (int i = threadIdx.x; i < n; i += kSelectThreads) {
      const int32_t v = i < nb ? i : -1;
      ws_sel[i] = v;
      if (pub != nullptr) pub[i] = v;
    }
    return;
  }
  uint32_t* keys = reinterpret_cast<uint32_t*>(smem);
  float* lse = reinterpret_cast<float*>(keys + a.plan.lb_stride);
  const int64_t nc = NumCompressed(geo, t);
  // This thread's first two blocks' lb of the first kPrefetch heads, requested now so that their
  // latency overlaps the log-sum-exp phase's.
  constexpr int kPrefetch = 16;
  const float* lb = a.lb + static_cast<int64_t>(pair) * G * a.plan.lb_stride;
  float2 first[kPrefetch];
#pragma unroll
  for (int h = 0; h < kPrefetch; ++h) {
    first[h] = h < G && nc > 0 && 2 * static_cast<int>(threadIdx.x) < nb
                   ? *reinterpret_cast<const float2*>(lb + static_cast<int64_t>(h) * a.plan.lb_stride + 2 * threadIdx.x)
                   : make_float2(0.f, 0.f);
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int h = warp; h < G; h += kSelectThreads / kWarpSize) {  // a warp per head, lanes over splits
    float m = -INFINITY, l = 0.0f;
    for (int s0 = lane; s0 < a.plan.cmp_splits; s0 += 4 * kWarpSize) {  // four loads in flight
      float2 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int s = s0 + u * kWarpSize;
        v[u] = s < a.plan.cmp_splits ? a.states.ml[a.states.Index(pair, s) + h] : make_float2(0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (v[u].y > 0.0f) {
          const float m_new = fmaxf(m, v[u].x);
          l = l * exp2f(m - m_new) + v[u].y * exp2f(v[u].x - m_new);
          m = m_new;
        }
      }
    }
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o >>= 1) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m, o), l_other = __shfl_xor_sync(0xffffffffu, l, o);
      const float m_new = fmaxf(m, m_other);
      if (m_new != -INFINITY) l = l * exp2f(m - m_new) + l_other * exp2f(m_other - m_new);
      m = m_new;
    }
    if (lane == 0) lse[h] = m + log2f(l);
  }
  __syncthreads();
  // Keys: forced blocks above every score; scores are >= 0 floats, whose bits order like the values.
  // Each thread scores 2 consecutive blocks from 8-byte loads of every head's lb row.
  const int64_t current = nb - 1;
  for (int j0 = 2 * threadIdx.x; j0 < nb; j0 += 2 * kSelectThreads) {
    float2 score = make_float2(0.f, 0.f);
    if (nc > 0) {
      auto lb_at = [&](int h) {
        return *reinterpret_cast<const float2*>(lb + static_cast<int64_t>(h) * a.plan.lb_stride + j0);
      };
      auto add = [&](int h, float2 v) {
        score.x += exp2f(v.x - lse[h]);
        score.y += exp2f(v.y - lse[h]);
      };
      const bool prefetched = j0 == 2 * static_cast<int>(threadIdx.x);
#pragma unroll
      for (int h = 0; h < kPrefetch && h < G; ++h) add(h, prefetched ? first[h] : lb_at(h));
#pragma unroll 16
      for (int h = kPrefetch; h < G; ++h) add(h, lb_at(h));
    }
    const float sc[2] = {score.x, score.y};
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int j = j0 + u;
      if (j >= nb) break;
      const bool forced = j < geo.forced_initial || j > current - geo.forced_local;
      keys[j] = forced ? 0xFFFFFFFFu : __float_as_uint(sc[u]);
    }
  }
  __syncthreads();

  // fla-org's chunked merge (NsaKernelGeometry::topk_merge_chunk): only the best C/2 keys of the
  // blocks before the current block's chunk and the best C/2 of that chunk survive, and the n
  // slots go to the best survivors (fewer when fewer survive).
  const int C = geo.topk_merge_chunk;
  const bool chunked = C > 0 && n > C / 2 && current >= C;
  if (!chunked && n <= kSelectWarps && ThresholdTopN(keys, nb, n, threshold, ws_sel, pub)) return;
  int take = n;
  if (chunked) {
    const int chunk_start = static_cast<int>(current / C * C);
    uint32_t prefix[2];
    int need[2];
    RadixSelect(keys, 0, chunk_start, C / 2, &prefix[0], &need[0]);
    const int in_chunk = min(C / 2, nb - chunk_start);
    RadixSelect(keys, chunk_start, nb, in_chunk, &prefix[1], &need[1]);
    // Survivors keep their order above every other key: forced keys stay 0xFFFFFFFF, score keys
    // (non-negative floats, top bit clear) get the top bit; every other key becomes 0.
    for (int part = 0; part < 2; ++part) {
      const int lo = part == 0 ? 0 : chunk_start, hi = part == 0 ? chunk_start : nb;
      ForEachKey(keys, lo, hi, prefix[part], need[part], scratch, [&](int j, bool chosen, int) {
        keys[j] = chosen ? (keys[j] | 0x80000000u) : 0u;
      });
    }
    __syncthreads();
    take = C / 2 + in_chunk < n ? C / 2 + in_chunk : n;
  }

  // The `take` largest keys, ties to the lower block id, in block order.
  uint32_t prefix = 0;
  int need = 0;
  RadixSelect(keys, 0, nb, take, &prefix, &need);
  ForEachKey(keys, 0, nb, prefix, need, scratch, [&](int j, bool chosen, int pos) {
    if (!chosen) return;
    ws_sel[pos] = j;
    if (pub != nullptr) pub[pos] = j;
  });
  for (int i = take + threadIdx.x; i < n; i += kSelectThreads) {
    ws_sel[i] = -1;
    if (pub != nullptr) pub[i] = -1;
  }
}

// ---- Kernel 4 -------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kMergeThreads) NsaMergeKernel(const NsaSplitArgs a) {
  __shared__ float gate[3 * splitkv::kMergeMaxHeads];  // [branch in slot order][head of the CTA]
  const NsaDecodeParams& p = a.p;
  const int G = p.num_heads / p.num_kv_heads, heads = a.plan.merge_heads, per_pair = G / heads;
  const int pair = blockIdx.x / per_pair, h0 = (blockIdx.x % per_pair) * heads;
  const int seq = pair / p.num_kv_heads, kv_head = pair % p.num_kv_heads;
  const int64_t head0 = static_cast<int64_t>(seq) * p.num_heads + static_cast<int64_t>(kv_head) * G + h0;
  bf16* out = p.out + head0 * p.head_dim_v;
  const int64_t t = p.positions[seq];
  if (t < 0 || t >= p.max_context) {
    for (int c = threadIdx.x; c < heads * p.head_dim_v; c += kMergeThreads) out[c] = __float2bfloat16(NAN);
    return;
  }
  // Gates and positions are step inputs, complete before this kernel could start: it starts only
  // after every selected-phase CTA started, which happens only after the select kernel passed its
  // wait, i.e. after the compressed kernel (which waited for the step's inputs) completed.
  // The partial states need the wait. Slot order is (compressed, window, selected); the gates are
  // stored (cmp, slc, win).
  if (static_cast<int>(threadIdx.x) < 3 * heads) {
    const int b = threadIdx.x / heads, i = threadIdx.x % heads;
    gate[threadIdx.x] = LoadGate(GatesAt(p.gates, p.gate_dtype, head0 + i), p.gate_dtype, b == 0 ? 0 : 3 - b);
  }
  WaitForPrerequisiteGrids();
  const int begin[4] = {0, a.plan.cmp_splits, a.plan.cmp_splits + a.plan.win_splits, a.plan.Slots()};
  splitkv::MergeBranches<3>(a.states, pair, h0, heads, begin, gate, out);
}

// ---- Host plan ------------------------------------------------------------------------------------

// Sets a.sel_boxes / a.cmp_boxes (and their maps) where the chunks allow tensor-map boxes (see
// NsaSplitArgs) and p.cp_async_copies does not forbid them.
template <int DK, int DV>
void ChooseBoxes(const NsaDecodeParams& p, NsaSplitArgs* a) {
  a->sel_boxes = a->cmp_boxes = false;
  if (p.cp_async_copies || !splitkv::Tile<DK, DV>::kBoxes) return;
  const NsaKernelGeometry& g = p.geometry;
  a->sel_boxes =
      g.sel_block % kRows == 0 && splitkv::MakeCacheBoxMaps(p.selection, p.num_kv_heads, DK, DV, &a->sel_maps);
  // Chunk c starts at FirstOverlappingToken(c B), linear in c past c = 0: multiples of kRows when
  // chunks 1 and 2 start at kRows and 2 kRows.
  const int B = CmpBlocksPerChunk(g);
  const bool aligned = B > 0 && nsa_chunks::FirstOverlappingToken<int64_t>(g, B) == kRows &&
                       nsa_chunks::FirstOverlappingToken<int64_t>(g, 2 * B) == 2 * kRows;
  a->cmp_boxes = aligned && splitkv::MakeCacheBoxMaps(p.compressed, p.num_kv_heads, DK, DV, &a->cmp_maps);
}

// Dynamic shared memory of kernels 1/3 (the larger of the score tile and the selected-id list).
template <int DK, int DV>
size_t PartialSmemBytes(int G, int num_selected, bool score) {
  const size_t tile = score ? static_cast<size_t>(splitkv::HeadTiles(G)) * 16 * splitkv::kScoreStride * 4 : 0;
  const size_t ids = static_cast<size_t>(num_selected) * 4;
  return splitkv::Tile<DK, DV>::kAuxOffset + (tile > ids ? tile : ids);
}

inline size_t SelectSmemBytes(int lb_stride, int G) { return (static_cast<size_t>(lb_stride) + G) * 4; }

// The plan for p on a device with `ctas_per_wave` resident partial-kernel CTAs, using at most
// `limit` workspace bytes: the heuristic split sizes, made coarser (fewer slots) until the workspace
// fits. false when even one split per branch does not fit, or the geometry cannot be chunked.
inline bool MakeNsaSplitPlan(const NsaDecodeParams& p, int dv, int ctas_per_wave, int forced_cps, size_t limit,
                             NsaSplitPlan* out) {
  using splitkv::AlignUp;
  using splitkv::CeilDiv;
  const NsaKernelGeometry& geo = p.geometry;
  NsaSplitPlan plan;
  plan.blocks_per_chunk = CmpBlocksPerChunk(geo);
  if (plan.blocks_per_chunk < 1 || p.max_context < 1 || ctas_per_wave < 1) return false;
  const int G = p.num_heads / p.num_kv_heads, n = geo.num_selected;
  const int64_t pairs = static_cast<int64_t>(p.num_seqs) * p.num_kv_heads;
  plan.max_blocks = (p.max_context - 1) / geo.sel_block + 1;
  plan.lb_stride = (plan.max_blocks + 3) / 4 * 4;
  plan.score = plan.max_blocks > n;
  const int cmp_chunks = CeilDiv(plan.max_blocks, plan.blocks_per_chunk);
  const int win_chunks = geo.window > 0 ? CeilDiv(geo.window < p.max_context ? geo.window : p.max_context, kRows) : 0;
  const int slc_chunks = CeilDiv(static_cast<int64_t>(n < plan.max_blocks ? n : plan.max_blocks) * geo.sel_block, kRows);
  plan.cmp_chunks = cmp_chunks;
  // Kernels 1 and 3: one wave of CTAs each, each pair's chunks cut into equal runs; kernel 3 spreads
  // the window over the CTAs that attend the selected blocks. Fewer, longer runs when the workspace
  // is short.
  const int cmp_base = splitkv::ChunksPerSplitOneWave(cmp_chunks, pairs, ctas_per_wave, forced_cps);
  const int slc_base = splitkv::ChunksPerSplitOneWave(slc_chunks, pairs, ctas_per_wave, forced_cps);
  for (int64_t coarsen = 1;; coarsen *= 2) {
    auto cps = [&](int base, int chunks) {
      const int64_t c = base * coarsen;
      return static_cast<int>(c < chunks ? c : (chunks > 0 ? chunks : 1));
    };
    plan.cmp_cps = cps(cmp_base, cmp_chunks);
    plan.slc_cps = cps(slc_base, slc_chunks);
    plan.cmp_splits = CeilDiv(cmp_chunks, plan.cmp_cps);
    plan.slc_splits = CeilDiv(slc_chunks, plan.slc_cps);
    plan.win_cps = win_chunks > 0 ? CeilDiv(win_chunks, plan.slc_splits) : 1;
    plan.win_splits = win_chunks > 0 ? CeilDiv(win_chunks, plan.win_cps) : 0;
    const size_t states = static_cast<size_t>(pairs) * plan.Slots() * G;
    plan.ml_offset = 0;
    plan.acc_offset = AlignUp(states * sizeof(float2));
    plan.lb_offset = plan.acc_offset + AlignUp(states * dv * sizeof(float));
    plan.sel_offset = plan.lb_offset + (plan.score ? AlignUp(static_cast<size_t>(pairs) * G * plan.lb_stride * 4) : 0);
    plan.bytes = plan.sel_offset + AlignUp(static_cast<size_t>(pairs) * n * 4);
    if (plan.bytes <= limit) break;
    if (plan.cmp_splits <= 1 && plan.slc_splits <= 1) return false;
  }
  *out = plan;
  return true;
}

}  // namespace needle::kernels::detail::nsa_split
