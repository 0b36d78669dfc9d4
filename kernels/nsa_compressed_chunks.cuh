// The compressed branch of NSA cut into chunks of whole selection blocks, shared by the split-KV
// decode (kernels/nsa_decode_split.cuh) and the tensor-core prefill (kernels/nsa_prefill_tc.cuh):
// which compressed tokens a chunk attends and scores, and the fold of a chunk's score tile into
// per-head log2 block masses. Device and host functions only (no kernels), so both may include it.
// CUDA only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/nsa_decode.h"
#include "kernels/split_kv_attention.cuh"

namespace needle::kernels::detail::nsa_chunks {

using splitkv::ChunkRange;
using splitkv::kRows;

__device__ __forceinline__ int64_t NumCompressed(const NsaKernelGeometry& g, int64_t t) {
  return t + 1 < g.cmp_block ? 0 : (t + 1 - g.cmp_block) / g.cmp_stride + 1;
}

// First compressed token that overlaps selection block j: i d + l > j l'. I is int64_t on the host
// and int in per-chunk device code (token indices fit in 32 bits; a 64-bit division costs ~70
// instructions).
template <class I>
__host__ __device__ __forceinline__ I FirstOverlappingToken(const NsaKernelGeometry& g, I j) {
  const I x = j * g.sel_block - g.cmp_block;
  return x < 0 ? 0 : x / g.cmp_stride + 1;
}

// First compressed token that starts in block j or later (owned by block j or a later one).
template <class I>
__host__ __device__ __forceinline__ I FirstOwnedToken(const NsaKernelGeometry& g, I j) {
  return (j * g.sel_block + g.cmp_stride - 1) / g.cmp_stride;
}

// The same two functions without a division per call when l and l' are multiples of d (every
// published geometry): block j owns tokens j P .. (j + 1) P - 1 (P = l' / d) and tokens from
// j P - L + 1 (L = l / d) overlap it. P == 0 falls back to the divisions. Built once per thread
// block; the split-KV kernels ask it for every chunk.
struct TokenGrid {
  int P = 0;
  int L = 0;

  __device__ static TokenGrid Of(const NsaKernelGeometry& g) {
    TokenGrid t;
    if (g.cmp_block % g.cmp_stride == 0 && g.sel_block % g.cmp_stride == 0) {
      t.P = g.sel_block / g.cmp_stride;
      t.L = g.cmp_block / g.cmp_stride;
    }
    return t;
  }
  __device__ int FirstOwned(const NsaKernelGeometry& g, int j) const {
    return P > 0 ? j * P : FirstOwnedToken(g, j);
  }
  __device__ int FirstOverlapping(const NsaKernelGeometry& g, int j) const {
    return P > 0 ? max(j * P - L + 1, 0) : FirstOverlappingToken(g, j);
  }
};

// Chunk c of a compressed branch cut into runs of B selection blocks, for a query with nb selection
// blocks and nc compressed tokens: blocks [*ja, *jb), the tokens they own (attended) and, before them,
// the earlier tokens overlapping block *ja (scored only), so the chunk scores its blocks completely.
__device__ __forceinline__ ChunkRange CompressedChunk(const NsaKernelGeometry& g, const TokenGrid& grid, int B, int c,
                                                      int nb, int nc, int* ja, int* jb) {
  *ja = c * B;
  *jb = min(*ja + B, nb);
  const int end = min(grid.FirstOwned(g, *jb), nc);
  const int attend = min(grid.FirstOwned(g, *ja), end);
  return ChunkRange{min(grid.FirstOverlapping(g, *ja), attend), attend, end};
}

// The most selection blocks a compressed chunk can hold (its owned tokens plus the earlier tokens
// overlapping its first block within kRows rows); 0 if not even one block fits.
inline int CmpBlocksPerChunk(const NsaKernelGeometry& g) {
  const int64_t unclamped = g.cmp_block / g.sel_block + 1;
  for (int b = kRows; b >= 1; --b) {
    bool fits = true;
    for (int64_t ja = 0; ja <= unclamped + g.cmp_stride && fits; ++ja) {
      fits = FirstOwnedToken(g, ja + b) - FirstOverlappingToken(g, ja) <= kRows;
    }
    if (fits) return b;
  }
  return 0;
}

// lb[h][j] = log2 sum_i exp2(s_hi) |[i d, i d + l) ∩ [j l', (j+1) l')| / d over the compressed tokens
// i overlapping block j, for the blocks ja..ja+nblk-1 of one chunk whose scores (log2 domain, entry
// i at tile column i - score_begin) are in `tile`. The chunk holds every token overlapping its
// blocks. lb's column 0 stands for block lb_first. All splitkv::kThreads threads of the block take
// part.
__device__ inline void BlockMasses(const NsaKernelGeometry& geo, const TokenGrid& grid, int G, const float* tile,
                                   int ja, int nblk, const ChunkRange& r, float* lb, int lb_stride,
                                   int lb_first = 0) {
  const int cl = geo.cmp_block, cd = geo.cmp_stride, sl = geo.sel_block;
  const int sb = static_cast<int>(r.score_begin), end = static_cast<int>(r.end);
  const float inv_d = 1.0f / static_cast<float>(cd);
  for (int i = threadIdx.x; i < G * nblk; i += splitkv::kThreads) {
    const int h = i / nblk, j = ja + (i - h * nblk);
    const int lo = max(grid.FirstOverlapping(geo, j), sb);
    const int hi = min(grid.FirstOwned(geo, j + 1), end);  // exclusive
    const float* srow = tile + h * splitkv::kScoreStride - sb;
    float mx = -INFINITY;
    for (int k = lo; k < hi; ++k) mx = fmaxf(mx, srow[k]);
    float sum = 0.0f;
    for (int k = lo; k < hi; ++k) {
      const int overlap = min(k * cd + cl, (j + 1) * sl) - max(k * cd, j * sl);
      sum += Exp2Ftz(srow[k] - mx) * static_cast<float>(overlap);
    }
    lb[h * lb_stride + j - lb_first] = sum > 0.0f ? mx + log2f(sum * inv_d) : -INFINITY;
  }
}

}  // namespace needle::kernels::detail::nsa_chunks
