// Device building blocks of the attention kernels (NSA decode, NSA prefill, dense): paged row
// addressing with an optional contiguous tail, a warp's online-softmax state for one query head, the
// block-level "attend the G heads of a KV group over a list of rows" routine built on a mergeable
// softmax state, and the per-(query token, KV group) NSA routine both NSA kernels run (compressed
// attention, block scores, top-n, selected and window attention, gated sum). CUDA only: .cu files
// include it. Correctness first: one thread block per (query token, KV head), warps spread over
// (head, row split), rows read straight from global memory; no tiling, no tensor cores yet.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/nsa_decode.h"
#include "kernels/paged_kv.h"

namespace needle::kernels::detail {

using bf16 = __nv_bfloat16;

constexpr int kWarpSize = 32;
constexpr int kNumWarps = 8;
constexpr int kThreads = kWarpSize * kNumWarps;
constexpr int kMaxGroupSize = 64;
constexpr int kDefaultSmemBytes = 48 * 1024;  // above this a kernel must opt in
constexpr int kMaxSmemBytes = 227 * 1024;     // sm_90 opt-in limit per block

// ---- Head-dim dispatch (host) -----------------------------------------------------------------

template <int kQk, int kV>
struct HeadDims {
  static constexpr int qk = kQk;
  static constexpr int v = kV;
};

constexpr int HeadDimsKey(int dk, int dv) { return dk * 1024 + dv; }

// Calls f(HeadDims<dk, dv>{}) for the instantiated pairs; cudaErrorInvalidValue for any other.
template <class F>
cudaError_t DispatchHeadDims(int dk, int dv, F&& f) {
  switch (HeadDimsKey(dk, dv)) {
    case HeadDimsKey(64, 64): return f(HeadDims<64, 64>{});
    case HeadDimsKey(128, 128): return f(HeadDims<128, 128>{});
    case HeadDimsKey(192, 128): return f(HeadDims<192, 128>{});
    case HeadDimsKey(192, 192): return f(HeadDims<192, 192>{});
    case HeadDimsKey(16, 16): return f(HeadDims<16, 16>{});
    case HeadDimsKey(32, 32): return f(HeadDims<32, 32>{});
    case HeadDimsKey(24, 16): return f(HeadDims<24, 16>{});
    default: return cudaErrorInvalidValue;
  }
}

inline bool AttentionSupported(int dk, int dv, int group_size) {
  if (group_size < 1 || group_size > kMaxGroupSize) return false;
  return DispatchHeadDims(dk, dv, [](auto) { return cudaSuccess; }) == cudaSuccess;
}

inline bool CacheValid(const PagedKvCache& c) {
  return c.k != nullptr && c.v != nullptr && c.page_table != nullptr && c.page_rows > 0 && c.ring_pages >= 0 &&
         c.table_stride >= 0;
}

inline bool NsaGeometryValid(const NsaKernelGeometry& g) {
  return g.cmp_block >= 1 && g.cmp_stride >= 1 && g.sel_block >= 1 && g.num_selected >= 1 && g.forced_initial >= 0 &&
         g.forced_local >= 0 && g.forced_initial + g.forced_local <= g.num_selected && g.window >= 0 &&
         g.topk_merge_chunk >= 0;
}

// Sets the kernel's dynamic shared memory limit when it needs more than the default.
template <class Kernel>
cudaError_t AllowDynamicSmem(Kernel kernel, size_t bytes) {
  if (bytes <= 32 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

__device__ inline int64_t MinI64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ inline int64_t MaxI64(int64_t a, int64_t b) { return a > b ? a : b; }

// The sequence that owns packed token `token`: the largest s with cu_tokens[s] <= token (empty
// sequences have cu_tokens[s] == cu_tokens[s + 1], so the largest one is the owner).
__device__ inline int FindSequence(const int32_t* cu_tokens, int num_seqs, int token) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu_tokens[mid] <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Gates of query-head index `head_index` (token * H + head) onwards.
__device__ inline const void* GatesAt(const void* gates, GateDType dtype, int64_t head_index) {
  return dtype == GateDType::kFp32 ? static_cast<const void*>(static_cast<const float*>(gates) + 3 * head_index)
                                   : static_cast<const void*>(static_cast<const bf16*>(gates) + 3 * head_index);
}

// ---- Rows ---------------------------------------------------------------------------------------

// One sequence's rows of one KV head: rows below tail_start from the paged cache (optionally a ring),
// rows from tail_start on from a contiguous buffer (a prefill chunk's window K/V). Mirrors
// reference::KvRows.
struct RowSource {
  const bf16* k = nullptr;  // pool base offset to the layer and the KV head
  const bf16* v = nullptr;
  int64_t k_page_stride = 0;
  int64_t v_page_stride = 0;
  const int32_t* table = nullptr;  // this sequence's row of the page table
  int page_rows = 1;
  int ring_pages = 0;
  int dk = 0;
  int dv = 0;
  const bf16* k_tail = nullptr;  // row tail_start of this KV head
  const bf16* v_tail = nullptr;
  int64_t tail_start = INT64_MAX;
  int64_t k_tail_stride = 0;  // elements between consecutive tail rows
  int64_t v_tail_stride = 0;

  // Row indices are token positions (int32), so the page arithmetic runs in 32 bits: a 64-bit
  // division is a ~70-instruction subroutine, and the split-KV kernels address every row of a chunk.
  // Page(i) is the dependent load of a row's address (its page-table entry; unused for tail rows),
  // split out so that a kernel can issue it well before it needs K(i, page) / V(i, page).
  __device__ int32_t Page(int64_t i) const {
    if (i >= tail_start) return 0;
    uint32_t logical = static_cast<uint32_t>(i) / static_cast<uint32_t>(page_rows);
    if (ring_pages > 0) logical %= static_cast<uint32_t>(ring_pages);
    return table[logical];
  }
  __device__ const bf16* K(int64_t i, int32_t page) const {
    return i >= tail_start ? k_tail + (i - tail_start) * k_tail_stride
                           : k + static_cast<int64_t>(page) * k_page_stride + InPage(i) * dk;
  }
  __device__ const bf16* V(int64_t i, int32_t page) const {
    return i >= tail_start ? v_tail + (i - tail_start) * v_tail_stride
                           : v + static_cast<int64_t>(page) * v_page_stride + InPage(i) * dv;
  }
  __device__ const bf16* K(int64_t i) const { return K(i, Page(i)); }
  __device__ const bf16* V(int64_t i) const { return V(i, Page(i)); }
  __device__ int64_t InPage(int64_t i) const {
    return static_cast<int64_t>(static_cast<uint32_t>(i) % static_cast<uint32_t>(page_rows));
  }
};

__device__ inline RowSource PagedRows(const PagedKvCache& c, int seq, int kv_head, int dk, int dv) {
  RowSource r;
  r.k = c.k + static_cast<int64_t>(kv_head) * c.page_rows * dk;
  r.v = c.v + static_cast<int64_t>(kv_head) * c.page_rows * dv;
  r.k_page_stride = c.k_page_stride;
  r.v_page_stride = c.v_page_stride;
  r.table = c.page_table + static_cast<int64_t>(seq) * c.table_stride;
  r.page_rows = c.page_rows;
  r.ring_pages = c.ring_pages;
  r.dk = dk;
  r.dv = dv;
  return r;
}

// ---- One warp, one query head -----------------------------------------------------------------

// Lane `lane` owns columns lane, lane + 32, ... of a D-vector.
__host__ __device__ constexpr int LaneCols(int d) { return (d + kWarpSize - 1) / kWarpSize; }

__device__ inline float WarpSum(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int D>
__device__ inline void LoadLaneCols(const bf16* row, int lane, float* x) {
#pragma unroll
  for (int j = 0; j < LaneCols(D); ++j) {
    const int c = lane + j * kWarpSize;
    x[j] = (D % kWarpSize == 0 || c < D) ? __bfloat162float(row[c]) : 0.0f;
  }
}

// Online softmax of one query head over rows fed one at a time: max m, sum l of exp(s - m), and the
// unnormalised output acc = sum exp(s - m) v, the lane's columns only. q is pre-scaled.
template <int DK, int DV>
struct WarpSoftmaxState {
  static constexpr int kQ = LaneCols(DK);
  static constexpr int kV = LaneCols(DV);
  float q[kQ];
  float acc[kV];
  float m;
  float l;

  __device__ void Begin(const bf16* q_row, float scale, int lane) {
    LoadLaneCols<DK>(q_row, lane, q);
#pragma unroll
    for (int j = 0; j < kQ; ++j) q[j] *= scale;
#pragma unroll
    for (int j = 0; j < kV; ++j) acc[j] = 0.0f;
    m = -INFINITY;
    l = 0.0f;
  }

  // scale * q.k, the same value in every lane.
  __device__ float Score(const bf16* k_row, int lane) const {
    float k[kQ];
    LoadLaneCols<DK>(k_row, lane, k);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < kQ; ++j) s += q[j] * k[j];
    return WarpSum(s);
  }

  __device__ void Add(float s, const bf16* v_row, int lane) {
    float v[kV];
    LoadLaneCols<DV>(v_row, lane, v);
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);  // 0 while m is -inf
    const float p = expf(s - m_new);
    l = l * corr + p;
#pragma unroll
    for (int j = 0; j < kV; ++j) acc[j] = acc[j] * corr + p * v[j];
    m = m_new;
  }
};

// Partial softmax states of the block's warps, merged per head (the mergeable state of split-KV).
template <int DV>
struct MergeScratch {
  float m[kNumWarps];
  float l[kNumWarps];
  float acc[kNumWarps][DV];
};

// ---- The G heads of a KV group over a list of rows ----------------------------------------------

// Softmax attention of heads 0..G-1 of one KV group (queries q_group [G][DK]) over `count` rows, one
// softmax across the list: list entry f is logical row row_of(f) of `src`. Warps are spread over
// (head, row split) in rounds of up to kNumWarps heads; the split partials are merged through
// `scratch`. For each head the warp that merged it calls sink(head, lane, o, lse): o[j] is the
// normalised output at column lane + 32 j (0 when count == 0), lse = log sum exp(scale q.k)
// (-inf when count == 0). Every thread of the block must call this (it synchronises, and returns
// synchronised).
template <int DK, int DV, class RowOf, class Sink>
__device__ void AttendHeads(int G, const bf16* q_group, float scale, const RowSource& src, int64_t count,
                            RowOf row_of, MergeScratch<DV>& scratch, Sink sink) {
  constexpr int kV = LaneCols(DV);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int g0 = 0; g0 < G; g0 += kNumWarps) {
    const int heads = min(G - g0, kNumWarps);
    const int splits = kNumWarps / heads;
    if (warp < heads * splits) {
      const int head = g0 + warp % heads, split = warp / heads;
      WarpSoftmaxState<DK, DV> st;
      st.Begin(q_group + static_cast<int64_t>(head) * DK, scale, lane);
      for (int64_t f = split; f < count; f += splits) {
        const int64_t r = row_of(f);
        const float s = st.Score(src.K(r), lane);
        st.Add(s, src.V(r), lane);
      }
      if (lane == 0) {
        scratch.m[warp] = st.m;
        scratch.l[warp] = st.l;
      }
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const int c = lane + j * kWarpSize;
        if (DV % kWarpSize == 0 || c < DV) scratch.acc[warp][c] = st.acc[j];
      }
    }
    __syncthreads();
    if (warp < heads) {
      float m = -INFINITY;
      for (int s = 0; s < splits; ++s) m = fmaxf(m, scratch.m[warp + s * heads]);
      float o[kV];
#pragma unroll
      for (int j = 0; j < kV; ++j) o[j] = 0.0f;
      float lse = -INFINITY;
      if (m != -INFINITY) {
        float l = 0.0f;
        for (int s = 0; s < splits; ++s) {
          const int w = warp + s * heads;
          const float f = expf(scratch.m[w] - m);
          l += scratch.l[w] * f;
#pragma unroll
          for (int j = 0; j < kV; ++j) {
            const int c = lane + j * kWarpSize;
            if (DV % kWarpSize == 0 || c < DV) o[j] += scratch.acc[w][c] * f;
          }
        }
#pragma unroll
        for (int j = 0; j < kV; ++j) o[j] /= l;
        lse = m + logf(l);
      }
      sink(g0 + warp, lane, o, lse);
    }
    __syncthreads();
  }
}

// ---- NSA: one query token, one KV group ---------------------------------------------------------

// Everything NsaGroupAttention needs about one (query token, KV group).
struct NsaQueryGroup {
  const bf16* q = nullptr;      // [G][DK] this token's query heads of the group
  const void* gates = nullptr;  // [G][3] of this token and group (bf16 or fp32 per gate_dtype)
  GateDType gate_dtype = GateDType::kBf16;
  bf16* out = nullptr;          // [G][DV]
  int32_t* selected = nullptr;  // [num_selected] or nullptr
  int64_t t = 0;                // the query's position
  int G = 1;
  float scale = 1.0f;
  RowSource cmp, sel, win;
};

// Dynamic shared memory of NsaGroupAttention: out_acc [G][DV] f32, gates [G][3] f32, lse [G] f32,
// block scores [max_blocks] f32, selected ids [num_selected] i32.
inline size_t NsaSmemBytes(int G, int dv, int max_blocks, int num_selected) {
  return sizeof(float) * (static_cast<size_t>(G) * dv + 3 * G + G + max_blocks) + sizeof(int32_t) * num_selected;
}

// Selection blocks a query at position max_context - 1 considers.
inline int NsaMaxBlocks(int max_context, int sel_block) { return (max_context - 1) / sel_block + 1; }

// score[j] = sum over the G heads and the compressed tokens i overlapping block j of
// exp(scale q_h.kc_i - lse_h) * |[i d, i d + l) ∩ [j l', (j+1) l')| / d, for j < num_blocks. One warp
// per block; the compressed keys of the overlapping tokens are re-read for each block they touch.
template <int DK>
__device__ void NsaBlockScores(const NsaQueryGroup& qg, const NsaKernelGeometry& geo, int64_t num_compressed,
                               int num_blocks, const float* lse, float* scores) {
  constexpr int kQ = LaneCols(DK);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t l = geo.cmp_block, d = geo.cmp_stride, lp = geo.sel_block;
  for (int j = warp; j < num_blocks; j += kNumWarps) {
    const int64_t block_lo = j * lp, block_hi = block_lo + lp;
    // Token i overlaps the block when i d < block_hi and i d + l > block_lo.
    const int64_t i_lo = block_lo - l < 0 ? 0 : (block_lo - l) / d + 1;
    const int64_t i_hi = MinI64(num_compressed - 1, (block_hi - 1) / d);
    float score = 0.0f;
    for (int64_t i = i_lo; i <= i_hi; ++i) {
      const int64_t overlap = MinI64(i * d + l, block_hi) - MaxI64(i * d, block_lo);
      if (overlap <= 0) continue;
      float k[kQ];
      LoadLaneCols<DK>(qg.cmp.K(i), lane, k);
      float p = 0.0f;
      for (int h = 0; h < qg.G; ++h) {
        float q[kQ];
        LoadLaneCols<DK>(qg.q + static_cast<int64_t>(h) * DK, lane, q);
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < kQ; ++c) s += q[c] * k[c];
        s = WarpSum(s) * qg.scale;
        p += expf(s - lse[h]);
      }
      score += p * static_cast<float>(overlap) / static_cast<float>(d);
    }
    if (lane == 0) scores[j] = score;
  }
}

// Whether block a (score sa) ranks above block b (score sb): higher score, ties to the lower index.
__device__ __forceinline__ bool RanksAbove(float sa, int a, float sb, int b) { return sa > sb || (sa == sb && a < b); }

// The best-ranked block j in [lo, hi) with eligible(j, scores[j]), or -1 if none; every thread of
// the block gets the answer, and every thread must call it. kBlockThreads: the block's thread count
// (a multiple of 32; kThreads for the existing callers, 128 for the tensor-core NSA prefill).
template <int kBlockThreads = kThreads, class Eligible>
__device__ int BestBlock(const float* scores, int lo, int hi, Eligible eligible) {
  static_assert(kBlockThreads % kWarpSize == 0, "whole warps");
  constexpr int kBlockWarps = kBlockThreads / kWarpSize;
  __shared__ float red_score[kBlockWarps];
  __shared__ int red_block[kBlockWarps];
  __shared__ int result;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float best = -INFINITY;
  int best_j = INT32_MAX;
  for (int j = lo + threadIdx.x; j < hi; j += kBlockThreads) {
    const float s = scores[j];
    if (eligible(j, s) && RanksAbove(s, j, best, best_j)) best = s, best_j = j;
  }
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const float s = __shfl_xor_sync(0xffffffffu, best, o);
    const int j = __shfl_xor_sync(0xffffffffu, best_j, o);
    if (RanksAbove(s, j, best, best_j)) best = s, best_j = j;
  }
  if (lane == 0) red_score[warp] = best, red_block[warp] = best_j;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kBlockWarps; ++w) {
      if (RanksAbove(red_score[w], red_block[w], best, best_j)) best = red_score[w], best_j = red_block[w];
    }
    result = best_j == INT32_MAX ? -1 : best_j;
  }
  __syncthreads();
  return result;
}

// Fills sel[0..*count) with the selected blocks in ascending order (reference::SelectBlocks):
// forced blocks (the first forced_initial, the forced_local most recent) outrank every score, the
// rest rank by score with ties to the lower index, num_selected in all. Scores are >= 0; taken
// blocks get score -1.
//
// With geo.topk_merge_chunk = C > 0, n > C/2 and the current block at C or beyond (fla-org's Triton
// top-k), only the best C/2 blocks of [0, chunk start) and the best C/2 of [chunk start, num_blocks)
// compete, chunk start = (current / C) C. Each part's C/2-th best non-forced block is its threshold:
// a block survives when it ranks at or above its part's threshold.
// kBlockThreads: the block's thread count (see BestBlock).
template <int kBlockThreads = kThreads>
__device__ void NsaTopBlocks(const NsaKernelGeometry& geo, int64_t t, int num_blocks, float* scores, int32_t* sel,
                             int* count) {
  __shared__ int forced_in_part[2];
  const int64_t current = t / geo.sel_block;
  const int C = geo.topk_merge_chunk;
  const bool chunked = C > 0 && geo.num_selected > C / 2 && current >= C;
  const int chunk_start = chunked ? static_cast<int>(current / C * C) : num_blocks;
  if (threadIdx.x == 0) {
    int n = 0;
    forced_in_part[0] = forced_in_part[1] = 0;
    // Ascending ids, so that a part holding more than C/2 forced blocks keeps its lowest ones.
    auto take = [&](int64_t j) {
      if (j < 0 || j >= num_blocks || scores[j] < 0.0f || n >= geo.num_selected) return;
      const int part = j >= chunk_start ? 1 : 0;
      if (chunked && forced_in_part[part] >= C / 2) return;
      ++forced_in_part[part];
      scores[j] = -1.0f;
      sel[n++] = static_cast<int32_t>(j);
    };
    for (int j = 0; j < geo.forced_initial; ++j) take(j);
    for (int j = geo.forced_local - 1; j >= 0; --j) take(current - j);
    *count = n;
  }
  __syncthreads();
  // Each part's threshold: (score, block) of its last surviving non-forced block; (inf, -1) lets
  // none survive, all_survive[part] every one (the part has fewer than its quota).
  float thr_score[2] = {INFINITY, INFINITY};
  int thr_block[2] = {-1, -1};
  bool all_survive[2] = {!chunked, !chunked};
  if (chunked) {
    for (int part = 0; part < 2; ++part) {
      const int lo = part == 0 ? 0 : chunk_start, hi = part == 0 ? chunk_start : num_blocks;
      for (int r = 0; r < C / 2 - forced_in_part[part]; ++r) {
        const float ps = thr_score[part];
        const int pj = thr_block[part];
        const int j = BestBlock<kBlockThreads>(scores, lo, hi,
                                               [=](int jj, float s) { return s >= 0.0f && RanksAbove(ps, pj, s, jj); });
        if (j < 0) {
          all_survive[part] = true;
          break;
        }
        thr_score[part] = scores[j], thr_block[part] = j;
      }
    }
  }
  auto eligible = [&](int j, float s) {
    if (s < 0.0f) return false;
    const int part = j >= chunk_start ? 1 : 0;
    return all_survive[part] || !RanksAbove(thr_score[part], thr_block[part], s, j);
  };
  const int want = geo.num_selected - *count;
  for (int r = 0; r < want; ++r) {
    const int j = BestBlock<kBlockThreads>(scores, 0, num_blocks, eligible);
    if (j < 0) break;
    if (threadIdx.x == 0) {
      scores[j] = -1.0f;
      sel[(*count)++] = j;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int a = 1; a < *count; ++a) {  // insertion sort, count <= num_selected
      const int32_t x = sel[a];
      int b = a - 1;
      while (b >= 0 && sel[b] > x) sel[b + 1] = sel[b], --b;
      sel[b + 1] = x;
    }
  }
  __syncthreads();
}

__device__ inline float LoadGate(const void* gates, GateDType dtype, int i) {
  return dtype == GateDType::kFp32 ? static_cast<const float*>(gates)[i]
                                   : __bfloat162float(static_cast<const bf16*>(gates)[i]);
}

// The whole NSA attention of one query token and one KV group (reference::NsaAttention): compressed
// attention (keeping each head's log-sum-exp), block scores, top-n, selected attention, window
// attention, gated sum into qg.out. `smem` holds NsaSmemBytes(G, DV, max_blocks, num_selected) bytes.
// A query whose blocks exceed max_blocks gets NaN outputs (the caller's max_context was wrong).
template <int DK, int DV>
__device__ void NsaGroupAttention(const NsaQueryGroup& qg, const NsaKernelGeometry& geo, int max_blocks,
                                  char* smem, MergeScratch<DV>& scratch) {
  constexpr int kV = LaneCols(DV);
  const int G = qg.G;
  float* out_acc = reinterpret_cast<float*>(smem);
  float* gate = out_acc + G * DV;
  float* lse = gate + 3 * G;
  float* scores = lse + G;
  int32_t* sel = reinterpret_cast<int32_t*>(scores + max_blocks);
  __shared__ int num_sel;

  const int64_t t = qg.t;
  const int64_t lp = geo.sel_block;
  const int num_blocks = static_cast<int>(t / lp + 1);
  if (t < 0 || t / lp + 1 > max_blocks) {  // uniform across the block
    for (int i = threadIdx.x; i < G * DV; i += kThreads) qg.out[i] = __float2bfloat16(NAN);
    if (qg.selected != nullptr) {
      for (int i = threadIdx.x; i < geo.num_selected; i += kThreads) qg.selected[i] = -1;
    }
    return;
  }
  for (int i = threadIdx.x; i < G * DV; i += kThreads) out_acc[i] = 0.0f;
  for (int i = threadIdx.x; i < 3 * G; i += kThreads) gate[i] = LoadGate(qg.gates, qg.gate_dtype, i);
  __syncthreads();

  // A branch's per-head result, weighted by that head's gate, into out_acc.
  auto add_gated = [&](int branch) {
    return [=](int h, int lane, const float* o, float) {
      const float g = gate[3 * h + branch];
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const int c = lane + j * kWarpSize;
        if (DV % kWarpSize == 0 || c < DV) out_acc[h * DV + c] += g * o[j];
      }
    };
  };

  // 1. Compressed branch over rows 0..N_c(t)-1, keeping lse for the block scores.
  const int64_t nc = t + 1 < geo.cmp_block ? 0 : (t + 1 - geo.cmp_block) / geo.cmp_stride + 1;
  auto cmp_sink = [&](int h, int lane, const float* o, float h_lse) {
    add_gated(0)(h, lane, o, h_lse);
    if (lane == 0) lse[h] = h_lse;
  };
  AttendHeads<DK, DV>(G, qg.q, qg.scale, qg.cmp, nc, [](int64_t f) { return f; }, scratch, cmp_sink);

  // 2. Block selection: every block when there are at most n, else scores and top-n.
  if (num_blocks <= geo.num_selected) {
    for (int j = threadIdx.x; j < num_blocks; j += kThreads) sel[j] = j;
    if (threadIdx.x == 0) num_sel = num_blocks;
    __syncthreads();
  } else {
    if (nc > 0) {
      NsaBlockScores<DK>(qg, geo, nc, num_blocks, lse, scores);
    } else {
      for (int j = threadIdx.x; j < num_blocks; j += kThreads) scores[j] = 0.0f;
    }
    __syncthreads();
    NsaTopBlocks(geo, t, num_blocks, scores, sel, &num_sel);
  }
  const int ns = num_sel;
  if (qg.selected != nullptr) {
    for (int i = threadIdx.x; i < geo.num_selected; i += kThreads) qg.selected[i] = i < ns ? sel[i] : -1;
  }

  // 3. Selected branch: one softmax over the selected blocks' rows <= t. Ascending order puts the
  // only block that can be partial (the current one) last, so list entry f is in block sel[f / l'].
  const int64_t last_rows = MinI64(lp, t + 1 - static_cast<int64_t>(sel[ns - 1]) * lp);
  const int64_t sel_rows = static_cast<int64_t>(ns - 1) * lp + last_rows;
  AttendHeads<DK, DV>(
      G, qg.q, qg.scale, qg.sel, sel_rows, [&](int64_t f) { return static_cast<int64_t>(sel[f / lp]) * lp + f % lp; },
      scratch, add_gated(1));

  // 4. Window branch: rows max(0, t - w + 1)..t.
  if (geo.window > 0) {
    const int64_t begin = t - geo.window + 1 > 0 ? t - geo.window + 1 : 0;
    AttendHeads<DK, DV>(G, qg.q, qg.scale, qg.win, t + 1 - begin, [=](int64_t f) { return begin + f; }, scratch,
                        add_gated(2));
  }

  for (int i = threadIdx.x; i < G * DV; i += kThreads) qg.out[i] = __float2bfloat16(out_acc[i]);
}

}  // namespace needle::kernels::detail
