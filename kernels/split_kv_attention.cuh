// Split-KV decode attention building blocks shared by the NSA decode and dense decode kernels: one
// thread block (CTA) attends the G query heads of one KV group over a run of 64-row chunks of a paged
// row list and leaves a partial softmax state (max, sum, unnormalised output) in a workspace slot;
// a merge combines the slots of a branch with log-sum-exp weights. CUDA only (.cu files include it).
// It owns the tiling and the mergeable state; which rows a split covers, and what a branch means, is
// the calling kernel's business.
//
// Tiling: K and V rows of a chunk go global -> shared (two chunks in flight per CTA) either with
// 16-byte cp.async, rows padded by 16 bytes so ldmatrix is conflict-free, or, when the caller passes
// a TmaRows source (chunks that lie inside one page of a pool with a tensor map), as tensor-map boxes
// of [64 rows][64 columns] issued by one thread, landing with the 128-byte swizzle (TileAt). The G
// heads are the rows of 16-row MMA tiles (GQA packing: a KV row is read once for all G heads); 4
// warps are spread over
// (head tile, 16-token sub-tile); scores and P.V run on bf16 tensor cores (mma.m16n8k16, f32
// accumulation). P enters the P.V product as two bf16 parts (hi + lo), so the result carries ~16
// mantissa bits of each probability, not bf16's 8. Scores are kept in the log2 domain
// (s = scale * log2(e) * q.k, exp2).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <type_traits>

#include "kernels/attention_common.cuh"
#include "kernels/split_kv_tile.cuh"

namespace needle::kernels::detail::splitkv {

constexpr int kRows = 64;  // rows per chunk
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kStages = 2;
constexpr int kMaxGroup = 64;      // G <= 64: at most 4 head tiles of 16
constexpr int kMaxSplits = 256;    // splits of one branch of one (sequence, KV head)
constexpr int kScoreStride = kRows + 4;  // floats per head row of the score tile
constexpr float kLog2e = 1.4426950408889634f;

// Shared-memory geometry of one CTA for head dims DK/DV.
template <int DK, int DV>
struct Tile {
  static_assert(DK % 16 == 0 && DV % 16 == 0, "tensor-core tiles need head dims that are multiples of 16");
  static constexpr int kKStride = DK + 8;  // bf16 per K row in shared memory (+16 bytes: no bank conflicts)
  static constexpr int kVStride = DV + 8;
  static constexpr int kKSegs = DK / 8;  // 16-byte segments per row
  static constexpr int kVSegs = DV / 8;
  static constexpr size_t kStageBytes = static_cast<size_t>(kRows) * (kKStride + kVStride) * 2;
  static constexpr size_t kPipeBytes = kStages * kStageBytes;
  static constexpr size_t kRowPtrBytes = static_cast<size_t>(kStages) * 2 * kRows * sizeof(void*);
  // Cross-warp merge scratch ([kWarps][16][kOStride] f32 + [kWarps][16] float2) reuses the pipeline
  // buffers; rows padded by 4 floats so the fragment stores spread over the banks.
  static constexpr int kOStride = DV + 4;
  // ([kWarps][16] f32 merge weights follow.)
  static constexpr size_t kMergeBytes = static_cast<size_t>(kWarps) * 16 * kOStride * 4 + kWarps * 16 * 12;
  static_assert(kMergeBytes <= kPipeBytes, "merge scratch must fit in the pipeline buffers");
  // Bytes before the caller's auxiliary region (score tile, selected block list).
  static constexpr size_t kAuxOffset = kPipeBytes + kRowPtrBytes;
  // Tensor-map copies: K slabs at the stage's start, V slabs at kVOffset, both 1024-byte aligned
  // (the swizzle's period; dynamic shared memory starts 1024-aligned), and the stages' mbarriers in
  // the row address table, which that path does not use.
  static constexpr size_t kVOffset = static_cast<size_t>(kRows) * kKStride * 2;
  static constexpr bool kBoxes = DK % 64 == 0 && DV % 64 == 0 && kStageBytes % 1024 == 0 && kVOffset % 1024 == 0;
};

// Element (row, col) of a stage's K (D = DK) or V (D = DV) tile at `base`. Padded: rows of D + 8
// elements. Swizzled (tensor-map copies): D / 64 slabs of [kRows][64] elements (one 128-byte box row
// per tile row), 16-byte chunk j of row r stored at chunk j ^ (r % 8), the TMA 128-byte swizzle; the
// stage offsets (Tile) are multiples of 1024 bytes, the pattern's period. col % 8 == 0.
template <int D, bool kSwizzled>
__device__ __forceinline__ const bf16* TileAt(const bf16* base, int row, int col) {
  if constexpr (kSwizzled) {
    return base + (col >> 6) * (kRows * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3);
  } else {
    return base + row * (D + 8) + col;
  }
}

// Head tiles of 16 rows for G heads (1, 2 or 4, so that 4 warps divide evenly).
__host__ __device__ inline int HeadTiles(int G) { return G <= 16 ? 1 : G <= 32 ? 2 : 4; }

// Entries [score_begin, end) of a row list form one chunk (at most kRows); entries below attend_begin
// are scored (written to the score tile) but not attended.
struct ChunkRange {
  int64_t score_begin;
  int64_t attend_begin;
  int64_t end;
};

// Workspace slots of partial softmax states. For (pair, slot, head): ml = (m, l) with m the max of s
// (log2 domain) over the slot's rows and l = sum exp2(s - m); acc[DV] = sum exp2(s - m) v. l == 0
// marks an empty slot, whose acc is not written. pair = sequence * num_kv_heads + KV head.
struct PartialStates {
  float2* ml = nullptr;  // [pairs][slots][G]
  float* acc = nullptr;  // [pairs][slots][G][dv]
  int slots = 0;
  int G = 0;
  int dv = 0;

  __host__ __device__ int64_t Index(int pair, int slot) const {
    return (static_cast<int64_t>(pair) * slots + slot) * G;
  }
};

template <int DV>
struct WarpState {
  float o[DV / 8][4];  // C fragments of the [16][DV] output tile
  float m[2];          // rows lane/4 and lane/4 + 8
  float l[2];          // this lane's share of the row sums
};

// A fragments of head tile `mt` of q [G][DK]; rows >= G are zero.
template <int DK>
__device__ __forceinline__ void LoadQueryFragments(const bf16* q, int G, int mt, int lane, uint32_t (&qf)[DK / 16][4]) {
  const int r0 = mt * 16 + lane / 4, r1 = r0 + 8, c = 2 * (lane % 4);
#pragma unroll
  for (int kk = 0; kk < DK / 16; ++kk) {
    const int col = kk * 16 + c;
    qf[kk][0] = r0 < G ? *reinterpret_cast<const uint32_t*>(q + r0 * DK + col) : 0u;
    qf[kk][1] = r1 < G ? *reinterpret_cast<const uint32_t*>(q + r1 * DK + col) : 0u;
    qf[kk][2] = r0 < G ? *reinterpret_cast<const uint32_t*>(q + r0 * DK + col + 8) : 0u;
    qf[kk][3] = r1 < G ? *reinterpret_cast<const uint32_t*>(q + r1 * DK + col + 8) : 0u;
  }
}

// A fragments of head tile `mt` of a tile whose row r lives at row_ptr(r) (a [DK] bf16 row), or is
// absent (nullptr: zeros). LoadQueryFragments is the case row_ptr(r) = r < G ? q + r DK : nullptr;
// a prefill tile packs (query token, head) pairs as its rows.
template <int DK, class RowPtr>
__device__ __forceinline__ void LoadQueryFragmentRows(RowPtr row_ptr, int mt, int lane, uint32_t (&qf)[DK / 16][4]) {
  const int r0 = mt * 16 + lane / 4, c = 2 * (lane % 4);
  const bf16* q0 = row_ptr(r0);
  const bf16* q1 = row_ptr(r0 + 8);
#pragma unroll
  for (int kk = 0; kk < DK / 16; ++kk) {
    const int col = kk * 16 + c;
    qf[kk][0] = q0 != nullptr ? *reinterpret_cast<const uint32_t*>(q0 + col) : 0u;
    qf[kk][1] = q1 != nullptr ? *reinterpret_cast<const uint32_t*>(q1 + col) : 0u;
    qf[kk][2] = q0 != nullptr ? *reinterpret_cast<const uint32_t*>(q0 + col + 8) : 0u;
    qf[kk][3] = q1 != nullptr ? *reinterpret_cast<const uint32_t*>(q1 + col + 8) : 0u;
  }
}

// Rows of whole 128-byte lines (head dims multiples of 64): CopyChunk has thread t copy segment t % 8
// of every line of rows t / 8 + 16 i, so one row address serves DK / 64 + DV / 64 copies at fixed
// offsets and a warp moves four rows' lines per instruction (no index division, no pointer load per
// 16 bytes).
template <int DK, int DV>
constexpr bool kWholeLines = DK % 64 == 0 && DV % 64 == 0;

// This thread's share of row `row` of stage `stage` (K at kp, V at vp; zeros when !valid).
template <int DK, int DV>
__device__ __forceinline__ void CopyRowLines(char* smem, int stage, int row, const bf16* kp, const bf16* vp,
                                             bool valid) {
  using T = Tile<DK, DV>;
  bf16* ks = reinterpret_cast<bf16*>(smem + stage * T::kStageBytes) + row * T::kKStride;
  bf16* vs = reinterpret_cast<bf16*>(smem + stage * T::kStageBytes) + kRows * T::kKStride + row * T::kVStride;
  const int seg = (threadIdx.x % 8) * 8;
#pragma unroll
  for (int l = 0; l < DK / 64; ++l) CpAsync16(ks + l * 64 + seg, kp + l * 64 + seg, valid);
#pragma unroll
  for (int l = 0; l < DV / 64; ++l) CpAsync16(vs + l * 64 + seg, vp + l * 64 + seg, valid);
}

// Row threadIdx.x of a chunk and its page-table entry. LookUpRow issues the page-table load;
// StoreRowPointers, called later, writes the row's K/V addresses to stage `stage`'s slot of the row
// address table. In between, the load's latency can hide behind other work (the previous chunk's
// tensor-core math), and the barrier that follows that work publishes the addresses to CopyChunk.
// The slot must no longer be read by an earlier CopyChunk of the same stage (a barrier in between).
struct RowLookup {
  int64_t row = 0;
  int32_t page = 0;
  int rows = 0;  // rows of the chunk; threads >= rows look up nothing
};

template <class RowOf>
__device__ __forceinline__ RowLookup LookUpRow(const RowSource& src, RowOf row_of, const ChunkRange& r) {
  RowLookup l;
  l.rows = static_cast<int>(r.end - r.score_begin);
  if (static_cast<int>(threadIdx.x) < l.rows) {
    l.row = row_of(r.score_begin + threadIdx.x);
    l.page = src.Page(l.row);
  }
  return l;
}

template <int DK, int DV>
__device__ __forceinline__ void StoreRowPointers(char* smem, int stage, const RowSource& src, const RowLookup& l) {
  using T = Tile<DK, DV>;
  const bf16** rk = reinterpret_cast<const bf16**>(smem + T::kPipeBytes) + stage * 2 * kRows;
  if (static_cast<int>(threadIdx.x) < l.rows) {
    rk[threadIdx.x] = src.K(l.row, l.page);
    rk[kRows + threadIdx.x] = src.V(l.row, l.page);
  }
}

// Both at once, for callers with nothing to overlap: then a __syncthreads, then CopyChunk.
template <int DK, int DV, class RowOf>
__device__ __forceinline__ void StageRowPointers(char* smem, int stage, const RowSource& src, RowOf row_of,
                                                 const ChunkRange& r) {
  StoreRowPointers<DK, DV>(smem, stage, src, LookUpRow(src, row_of, r));
}

template <int DK, int DV>
__device__ void CopyChunk(char* smem, int stage, const RowSource& src, const ChunkRange& r) {
  using T = Tile<DK, DV>;
  bf16* ks = reinterpret_cast<bf16*>(smem + stage * T::kStageBytes);
  bf16* vs = ks + kRows * T::kKStride;
  const bf16** rk = reinterpret_cast<const bf16**>(smem + T::kPipeBytes) + stage * 2 * kRows;
  const bf16** rv = rk + kRows;
  const int rows = static_cast<int>(r.end - r.score_begin);
  const int fill = (rows + 15) & ~15;
  if constexpr (kWholeLines<DK, DV>) {
#pragma unroll
    for (int i = 0; i < kRows * 8 / kThreads; ++i) {
      const int row = static_cast<int>(threadIdx.x) / 8 + i * (kThreads / 8);
      if (row >= fill) break;
      const bool valid = row < rows;
      CopyRowLines<DK, DV>(smem, stage, row, valid ? rk[row] : src.k, valid ? rv[row] : src.v, valid);
    }
  } else {
    for (int i = threadIdx.x; i < fill * T::kKSegs; i += kThreads) {
      const int row = i / T::kKSegs, seg = i - row * T::kKSegs;
      const bool valid = row < rows;
      CpAsync16(ks + row * T::kKStride + seg * 8, valid ? rk[row] + seg * 8 : src.k, valid);
    }
    for (int i = threadIdx.x; i < fill * T::kVSegs; i += kThreads) {
      const int row = i / T::kVSegs, seg = i - row * T::kVSegs;
      const bool valid = row < rows;
      CpAsync16(vs + row * T::kVStride + seg * 8, valid ? rv[row] + seg * 8 : src.v, valid);
    }
  }
  CpAsyncCommit();
}

// Starts the copy of one chunk's K/V rows into pipeline stage `stage`. Rows past the chunk, up to the
// next multiple of 16, are zero-filled (a sub-tile is computed whole; its padding rows must not be
// NaN). Every thread must call it (it synchronises once: row addresses go through shared memory so
// each page-table lookup happens once per row).
template <int DK, int DV, class RowOf>
__device__ void IssueChunk(char* smem, int stage, const RowSource& src, RowOf row_of, const ChunkRange& r) {
  StageRowPointers<DK, DV>(smem, stage, src, row_of, r);
  __syncthreads();
  CopyChunk<DK, DV>(smem, stage, src, r);
}

// Chunks copied as tensor-map boxes: the rows of a chunk, row_of(score_begin) = b onwards, must be
// consecutive and lie inside one page (b a multiple of kRows, page_rows a multiple of kRows). The
// maps view a pool as a [rows][d] bf16 matrix from the layer's (page 0, KV head 0, row 0) on, boxes
// of [kRows][64] with the 128-byte swizzle (MakeCacheBoxMaps); row i of this (sequence, KV head) is
// map row table[i / page_rows] * rows_per_page + head_row + i % page_rows (int32: the host checks
// that the map has fewer than 2^31 rows).
struct TmaRows {
  const CUtensorMap* k_map = nullptr;
  const CUtensorMap* v_map = nullptr;
  const int32_t* table = nullptr;  // this sequence's row of the page table
  int page_rows = 0;
  int rows_per_page = 0;  // map rows between consecutive physical pages (k_page_stride / d_k)
  int head_row = 0;       // KV head * page_rows

  __device__ int32_t Page(int64_t i) const {
    return table[static_cast<uint32_t>(i) / static_cast<uint32_t>(page_rows)];
  }
  __device__ int MapRow(int64_t i, int32_t page) const {
    const uint32_t in_page = static_cast<uint32_t>(i) % static_cast<uint32_t>(page_rows);
    return page * rows_per_page + head_row + static_cast<int>(in_page);
  }
};

// The cp.async path's tag (AttendChunks' default).
struct NoTma {};

// The stage mbarriers of the tensor-map path (Tile::kBoxes), in the unused row address table.
template <int DK, int DV>
__device__ __forceinline__ uint64_t* StageBarriers(char* smem) {
  return reinterpret_cast<uint64_t*>(smem + Tile<DK, DV>::kPipeBytes);
}

// One thread: the boxes of the chunk whose first row is `first` (in page `page`) into stage
// `stage`, completing on the stage's mbarrier.
template <int DK, int DV>
__device__ __forceinline__ void IssueChunkBoxes(char* smem, int stage, const TmaRows& src, int32_t page,
                                                int64_t first) {
  using T = Tile<DK, DV>;
  uint64_t* bar = StageBarriers<DK, DV>(smem) + stage;
  char* ks = smem + stage * T::kStageBytes;
  const int row = src.MapRow(first, page);
  FenceProxyAsyncShared();
  MbarArriveExpect(bar, static_cast<uint32_t>(kRows) * (DK + DV) * 2);
#pragma unroll
  for (int slab = 0; slab < DK / 64; ++slab) TmaLoad2d(ks + slab * kRows * 128, src.k_map, slab * 64, row, bar);
#pragma unroll
  for (int slab = 0; slab < DV / 64; ++slab) {
    TmaLoad2d(ks + T::kVOffset + slab * kRows * 128, src.v_map, slab * 64, row, bar);
  }
}

// A box always brings kRows rows; V rows [rows, 16-row padding) of a short chunk hold whatever
// follows in the page (NaN in a poisoned pool) and must be zeros before P.V (P is 0 there, and 0 x
// NaN is NaN). K rows there only produce scores the mask replaces. Every thread calls it.
template <int DK, int DV>
__device__ __forceinline__ void ZeroBoxTail(char* smem, int stage, int rows) {
  using T = Tile<DK, DV>;
  const int fill = (rows + 15) & ~15;
  char* vs = smem + stage * T::kStageBytes + T::kVOffset;
  constexpr int kChunks = DV / 8;  // 16-byte chunks per row (all of a row's, so the swizzle does not matter)
  for (int i = threadIdx.x; i < (fill - rows) * kChunks; i += kThreads) {
    const int row = rows + i / kChunks, j = i % kChunks;
    *reinterpret_cast<uint4*>(vs + (j / 8) * kRows * 128 + row * 128 + (j % 8) * 16) = make_uint4(0, 0, 0, 0);
  }
  FenceProxyAsyncShared();
}

// Where a CTA leaves the scores s (log2 domain) of each chunk, if anywhere: `tile` holds one chunk
// ([16 * head tiles][kScoreStride], then the CTA calls its after-chunk hook); `rows` receives them
// directly, row h at rows + h * row_stride + entry (heads < G only, no hook needed).
struct ScoreSink {
  float* tile = nullptr;
  float* rows = nullptr;
  int row_stride = 0;
};

// One warp's share of a chunk in stage `stage`: sub-tiles group, group + groups, ... of 16 rows,
// each folded into the warp's online softmax. Rows < attend_off are scored only; rows >= rows are
// padding. Every head row's s of every row < rows goes to score_tile and/or score_rows (row
// stride score_stride, chunk row 0 at column 0) when those are not null.
template <int DK, int DV, bool kSwizzled = false>
__device__ void ComputeChunk(const char* smem, int stage, const uint32_t (&qf)[DK / 16][4], int mt, int group,
                             int groups, int rows, int attend_off, float scale_log2, float* score_tile,
                             float* score_rows, int score_stride, int G, WarpState<DV>& st) {
  using T = Tile<DK, DV>;
  const int lane = threadIdx.x % kWarpSize;
  const bf16* ks = reinterpret_cast<const bf16*>(smem + stage * T::kStageBytes);
  const bf16* vs = ks + kRows * T::kKStride;
  for (int sub = group; sub * 16 < rows; sub += groups) {
    const int r0 = sub * 16;
    // Two accumulator chains (even and odd k-steps): the MMAs of one chain depend on each other.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float s_odd[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) {
      uint32_t b[4];
      LdMatrixX4(b, TileAt<DK, kSwizzled>(ks, r0 + ((lane >> 4) << 3) + (lane & 7), kk * 16 + ((lane >> 3) & 1) * 8));
      MmaBf16(kk % 2 == 0 ? s[0] : s_odd[0], qf[kk], b[0], b[1]);
      MmaBf16(kk % 2 == 0 ? s[1] : s_odd[1], qf[kk], b[2], b[3]);
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] += s_odd[nt][e];
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = r0 + nt * 8 + 2 * (lane & 3) + (e & 1);
        const float v = s[nt][e] * scale_log2;
        const int head = mt * 16 + (lane >> 2) + 8 * (e >> 1);
        if (score_tile != nullptr && col < rows) score_tile[head * kScoreStride + col] = v;
        if (score_rows != nullptr && col < rows && head < G) score_rows[head * score_stride + col] = v;
        s[nt][e] = (col >= attend_off && col < rows) ? v : -INFINITY;
      }
    }
    float mx[2] = {fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1])),
                   fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]))};
    float corr[2], base[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float m_new = fmaxf(st.m[i], mx[i]);
      base[i] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing attended yet stays empty
      corr[i] = Exp2Ftz(st.m[i] - base[i]);
      st.m[i] = m_new;
    }
    float p[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nt][e] = Exp2Ftz(s[nt][e] - base[e >> 1]);
    }
    st.l[0] = st.l[0] * corr[0] + (p[0][0] + p[0][1]) + (p[1][0] + p[1][1]);
    st.l[1] = st.l[1] * corr[1] + (p[0][2] + p[0][3]) + (p[1][2] + p[1][3]);
    // Once the row maxima settle most sub-tiles move none of them: skip the DV / 2 multiplies.
    if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
      for (int n = 0; n < DV / 8; ++n) {
        st.o[n][0] *= corr[0];
        st.o[n][1] *= corr[0];
        st.o[n][2] *= corr[1];
        st.o[n][3] *= corr[1];
      }
    }
    // P as the A operand: the S fragments of token tiles 0 and 1 are exactly the k = 0..7 and
    // k = 8..15 halves of a 16x16 A fragment.
    uint32_t hi[4], lo[4];
    SplitBf16(p[0][0], p[0][1], &hi[0], &lo[0]);
    SplitBf16(p[0][2], p[0][3], &hi[1], &lo[1]);
    SplitBf16(p[1][0], p[1][1], &hi[2], &lo[2]);
    SplitBf16(p[1][2], p[1][3], &hi[3], &lo[3]);
#pragma unroll
    for (int dn = 0; dn < DV / 16; ++dn) {
      uint32_t b[4];
      LdMatrixX4Trans(b, TileAt<DV, kSwizzled>(vs, r0 + ((lane >> 3) & 1) * 8 + (lane & 7), dn * 16 + (lane >> 4) * 8));
      MmaBf16(st.o[2 * dn], hi, b[0], b[1]);
      MmaBf16(st.o[2 * dn], lo, b[0], b[1]);
      MmaBf16(st.o[2 * dn + 1], hi, b[2], b[3]);
      MmaBf16(st.o[2 * dn + 1], lo, b[2], b[3]);
    }
  }
}

// FlashAttention-2 style step (prefill): one warp's own 16 query rows (A fragments qf) against every
// row of the chunk in stage `stage`, one online-softmax update per chunk (not per 16-row sub-tile as
// ComputeChunk), then P.V. Chunk row j is attended by the lane's tile row i (i = 0: lane/4, 1:
// lane/4 + 8) when j < col_end[i] (<= rows; 0 for an absent row) if `masked`, else when j < rows ==
// kRows (a full chunk every row attends: the caller's unmasked fast path). Rows past `rows` (stale
// or zero-filled shared memory) never enter P.V. kSplitP: P as bf16 hi + lo (ComputeChunk's
// precision, twice the P.V MMAs); otherwise P is rounded to bf16 once, as FlashAttention does.
template <int DK, int DV, bool kSplitP>
__device__ __forceinline__ void ComputeChunkRows(const char* smem, int stage, const uint32_t (&qf)[DK / 16][4],
                                                 int rows, bool masked, const int (&col_end)[2], float scale_log2,
                                                 WarpState<DV>& st) {
  using T = Tile<DK, DV>;
  constexpr int kSubs = kRows / 16;
  const int lane = threadIdx.x % kWarpSize;
  const bf16* ks = reinterpret_cast<const bf16*>(smem + stage * T::kStageBytes);
  const bf16* vs = ks + kRows * T::kKStride;
  // S = Q K^T for the whole chunk: 2 kSubs independent accumulator chains per k-step. Sub-tiles past
  // `rows` are computed from stale rows and then masked (the mask replaces, never multiplies).
  float s[2 * kSubs][4];
#pragma unroll
  for (int nt = 0; nt < 2 * kSubs; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < DK / 16; ++kk) {
#pragma unroll
    for (int sub = 0; sub < kSubs; ++sub) {
      uint32_t b[4];
      LdMatrixX4(b, ks + (sub * 16 + ((lane >> 4) << 3) + (lane & 7)) * T::kKStride + kk * 16 + ((lane >> 3) & 1) * 8);
      MmaBf16(s[2 * sub], qf[kk], b[0], b[1]);
      MmaBf16(s[2 * sub + 1], qf[kk], b[2], b[3]);
    }
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 2 * kSubs; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float v = s[nt][e] * scale_log2;
      if (masked) {
        const int col = nt * 8 + 2 * (lane & 3) + (e & 1);
        v = col < col_end[e >> 1] ? v : -INFINITY;
      }
      s[nt][e] = v;
      mx[e >> 1] = fmaxf(mx[e >> 1], v);
    }
  }
  float corr[2], base[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    const float m_new = fmaxf(st.m[i], mx[i]);
    base[i] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing attended yet stays empty
    corr[i] = Exp2Ftz(st.m[i] - base[i]);
    st.m[i] = m_new;
  }
  float rs[2] = {0.0f, 0.0f};
#pragma unroll
  for (int nt = 0; nt < 2 * kSubs; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = Exp2Ftz(s[nt][e] - base[e >> 1]);
      rs[e >> 1] += s[nt][e];
    }
  }
  st.l[0] = st.l[0] * corr[0] + rs[0];
  st.l[1] = st.l[1] * corr[1] + rs[1];
  // Once the row maxima settle, most chunks leave every row's max alone: skip the rescale.
  if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
    for (int n = 0; n < DV / 8; ++n) {
      st.o[n][0] *= corr[0];
      st.o[n][1] *= corr[0];
      st.o[n][2] *= corr[1];
      st.o[n][3] *= corr[1];
    }
  }
  const int subs = (rows + 15) >> 4;
#pragma unroll
  for (int sub = 0; sub < kSubs; ++sub) {
    if (sub >= subs) break;
    // The S fragments of key tiles 2 sub and 2 sub + 1 are the two k halves of a 16x16 A fragment.
    uint32_t hi[4], lo[4];
    if (kSplitP) {
      SplitBf16(s[2 * sub][0], s[2 * sub][1], &hi[0], &lo[0]);
      SplitBf16(s[2 * sub][2], s[2 * sub][3], &hi[1], &lo[1]);
      SplitBf16(s[2 * sub + 1][0], s[2 * sub + 1][1], &hi[2], &lo[2]);
      SplitBf16(s[2 * sub + 1][2], s[2 * sub + 1][3], &hi[3], &lo[3]);
    } else {
      hi[0] = PackBf16(s[2 * sub][0], s[2 * sub][1]);
      hi[1] = PackBf16(s[2 * sub][2], s[2 * sub][3]);
      hi[2] = PackBf16(s[2 * sub + 1][0], s[2 * sub + 1][1]);
      hi[3] = PackBf16(s[2 * sub + 1][2], s[2 * sub + 1][3]);
    }
#pragma unroll
    for (int dn = 0; dn < DV / 16; ++dn) {
      uint32_t b[4];
      const int vrow = sub * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
      LdMatrixX4Trans(b, vs + vrow * T::kVStride + dn * 16 + (lane >> 4) * 8);
      MmaBf16(st.o[2 * dn], hi, b[0], b[1]);
      MmaBf16(st.o[2 * dn + 1], hi, b[2], b[3]);
      if (kSplitP) {
        MmaBf16(st.o[2 * dn], lo, b[0], b[1]);
        MmaBf16(st.o[2 * dn + 1], lo, b[2], b[3]);
      }
    }
  }
}

// A warp's query fragments as AttendChunks uses them (its head tile of the group), loaded ahead of
// the call when the caller has something to overlap them with.
template <int DK>
struct QueryFragments {
  uint32_t f[DK / 16][4];
};

template <int DK>
__device__ __forceinline__ QueryFragments<DK> LoadGroupQuery(const bf16* q_group, int G) {
  QueryFragments<DK> q;
  LoadQueryFragments<DK>(q_group, G, static_cast<int>(threadIdx.x / kWarpSize) % HeadTiles(G),
                         static_cast<int>(threadIdx.x % kWarpSize), q.f);
  return q;
}

// The CTA's whole job: attend the G heads of q_group ([G][DK], bf16) over chunks 0..num_chunks-1
// (chunk_of(c) -> ChunkRange; row_of(entry) -> row of `src`) and write the merged partial state of
// the CTA to ml_out [G] / acc_out [G][DV]. Scores go to `scores` (ScoreSink; for `rows`, entry e of
// the row list lands at column e); with a tile, after each chunk's scores are in it the CTA
// synchronises and calls after_chunk(c, range) on every thread. Every thread must call it; it may be
// called again on the same shared memory. smem: Tile<DK, DV>::kAuxOffset bytes, then the caller's
// auxiliary region. Query: `const bf16*` (q_group, loaded once the first chunks' copies are issued)
// or QueryFragments<DK> from LoadGroupQuery (already loaded). Copies: 16-byte cp.async through
// `src` (Tma = NoTma), or tensor-map boxes through `tma` (TmaRows; Tile<DK, DV>::kBoxes, each
// chunk's rows consecutive inside one page as TmaRows says; `src` is then unused).
template <int DK, int DV, class Query, class ChunkOf, class RowOf, class AfterChunk, class Tma = NoTma>
__device__ void AttendChunks(const Query& query, int G, float scale_log2, const RowSource& src, int num_chunks,
                             ChunkOf chunk_of, RowOf row_of, char* smem, const ScoreSink& scores,
                             AfterChunk after_chunk, float2* ml_out, float* acc_out, const Tma& tma = Tma{}) {
  constexpr bool kBoxes = std::is_same_v<Tma, TmaRows>;
  static_assert(!kBoxes || Tile<DK, DV>::kBoxes, "tensor-map copies need head dims that are multiples of 64");
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float* const score_tile = scores.tile;
  // A previous call's merge wrote the pipeline buffers through the generic proxy; the boxes write
  // them through the async proxy: every writer orders its writes before them.
  if constexpr (kBoxes) FenceProxyAsyncShared();
  __syncthreads();  // a previous call's merge may still read the shared memory
  const int m_tiles = HeadTiles(G), groups = kWarps / m_tiles;
  const int mt = warp % m_tiles, group = warp / m_tiles;

  WarpState<DV> st;
#pragma unroll
  for (int n = 0; n < DV / 8; ++n) st.o[n][0] = st.o[n][1] = st.o[n][2] = st.o[n][3] = 0.0f;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.0f;

  // Two chunks in flight: chunk c + 2 is issued as soon as chunk c's stage has been consumed.
  uint64_t* const bars = StageBarriers<DK, DV>(smem);
  if constexpr (kBoxes) {
    // Thread 0 sets up the stages' mbarriers and issues every box; the page-table entries of the
    // first two chunks are loaded together.
    if (threadIdx.x == 0) {
      for (int s = 0; s < kStages; ++s) MbarInit(&bars[s]);
      int64_t first[kStages];
      int32_t page[kStages];
#pragma unroll
      for (int c = 0; c < kStages; ++c) {
        first[c] = c < num_chunks ? row_of(chunk_of(c).score_begin) : 0;
        page[c] = c < num_chunks ? tma.Page(first[c]) : 0;
      }
#pragma unroll
      for (int c = 0; c < kStages; ++c) {
        if (c < num_chunks) IssueChunkBoxes<DK, DV>(smem, c, tma, page[c], first[c]);
      }
    }
    __syncthreads();  // the mbarriers are initialised before anyone waits on them
  } else {
    for (int c = 0; c < num_chunks && c < kStages; ++c) IssueChunk<DK, DV>(smem, c, src, row_of, chunk_of(c));
  }
  uint32_t qf[DK / 16][4];
  if constexpr (std::is_same_v<Query, QueryFragments<DK>>) {
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) qf[kk][i] = query.f[kk][i];
    }
  } else {
    LoadQueryFragments<DK>(query, G, mt, lane, qf);
  }
  for (int c = 0; c < num_chunks; ++c) {
    const ChunkRange r = chunk_of(c);
    const int rows = static_cast<int>(r.end - r.score_begin);
    if constexpr (kBoxes) {
      MbarWait(&bars[c % kStages], (c / kStages) & 1);
      if (rows % 16 != 0) {  // uniform over the CTA
        ZeroBoxTail<DK, DV>(smem, c % kStages, rows);
        __syncthreads();
      }
    } else {
      if (c + 1 < num_chunks) {
        CpAsyncWait<1>();
      } else {
        CpAsyncWait<0>();
      }
      __syncthreads();
    }
    // Chunk c + 2's page-table lookups start now; their addresses are stored after the math, where
    // the barrier that frees stage c % kStages also publishes them (two barriers per chunk). Boxes:
    // thread 0 looks up the chunk's one page and issues its boxes after that barrier.
    const bool more = c + kStages < num_chunks;
    const ChunkRange next = more ? chunk_of(c + kStages) : r;
    RowLookup lookup;
    int64_t next_first = 0;
    int32_t next_page = 0;
    if constexpr (kBoxes) {
      if (more && threadIdx.x == 0) {
        next_first = row_of(next.score_begin);
        next_page = tma.Page(next_first);
      }
    } else {
      if (more) lookup = LookUpRow(src, row_of, next);
    }
    ComputeChunk<DK, DV, kBoxes>(smem, c % kStages, qf, mt, group, groups, rows,
                                 static_cast<int>(r.attend_begin - r.score_begin), scale_log2, score_tile,
                                 scores.rows == nullptr ? nullptr : scores.rows + r.score_begin, scores.row_stride, G,
                                 st);
    if constexpr (!kBoxes) {
      if (more) StoreRowPointers<DK, DV>(smem, c % kStages, src, lookup);
    }
    __syncthreads();  // stage c % kStages is free; chunk c + 2's addresses and the score tile are complete
    if constexpr (kBoxes) {
      if (more && threadIdx.x == 0) IssueChunkBoxes<DK, DV>(smem, c % kStages, tma, next_page, next_first);
    } else {
      if (more) CopyChunk<DK, DV>(smem, c % kStages, src, next);
    }
    if (score_tile != nullptr) {
      after_chunk(c, r);
      __syncthreads();  // the next chunk's scores overwrite the tile
    }
  }
  if constexpr (kBoxes) {
    if (threadIdx.x == 0) {
      for (int s = 0; s < kStages; ++s) MbarInval(&bars[s]);
    }
  }

  // Per-lane row sums -> row sums; then warps that share a head tile merge through shared memory.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    st.l[i] += __shfl_xor_sync(0xffffffffu, st.l[i], 1);
    st.l[i] += __shfl_xor_sync(0xffffffffu, st.l[i], 2);
  }
  constexpr int kOStride = Tile<DK, DV>::kOStride;
  float* sm_o = reinterpret_cast<float*>(smem);                              // [kWarps][16][kOStride]
  float2* sm_ml = reinterpret_cast<float2*>(sm_o + kWarps * 16 * kOStride);  // [kWarps][16]
  float* sm_w = reinterpret_cast<float*>(sm_ml + kWarps * 16);               // [kWarps][16]
#pragma unroll
  for (int n = 0; n < DV / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; e += 2) {
      const int row = lane / 4 + 8 * (e >> 1), col = n * 8 + 2 * (lane % 4);
      *reinterpret_cast<float2*>(sm_o + (warp * 16 + row) * kOStride + col) = make_float2(st.o[n][e], st.o[n][e + 1]);
    }
  }
  if (lane % 4 == 0) {
    sm_ml[warp * 16 + lane / 4] = make_float2(st.m[0], st.l[0]);
    sm_ml[warp * 16 + lane / 4 + 8] = make_float2(st.m[1], st.l[1]);
  }
  __syncthreads();
  // Each head's merged (m, l) and the weight of every warp's share in it, once per head; then the
  // outputs as weighted float4 sums (a head with no rows gets zeros and l = 0).
  if (static_cast<int>(threadIdx.x) < G) {
    const int h = threadIdx.x, tile = h / 16, row = h % 16;
    float m = -INFINITY;
    for (int g = 0; g < groups; ++g) m = fmaxf(m, sm_ml[(tile + g * m_tiles) * 16 + row].x);
    float l = 0.0f;
    for (int g = 0; g < groups; ++g) {
      const int w = (tile + g * m_tiles) * 16 + row;
      const float f = m == -INFINITY ? 0.0f : Exp2Ftz(sm_ml[w].x - m);
      l += sm_ml[w].y * f;
      sm_w[w] = f;
    }
    ml_out[h] = make_float2(m, l);
  }
  __syncthreads();
  constexpr int kVec = DV / 4;
  for (int i = threadIdx.x; i < G * kVec; i += kThreads) {
    const int h = i / kVec, c = (i - h * kVec) * 4, tile = h / 16, row = h % 16;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int g = 0; g < groups; ++g) {
      const int w = (tile + g * m_tiles) * 16 + row;
      const float f = sm_w[w];
      const float4 o = *reinterpret_cast<const float4*>(sm_o + w * kOStride + c);
      a.x += f * o.x;
      a.y += f * o.y;
      a.z += f * o.z;
      a.w += f * o.w;
    }
    *reinterpret_cast<float4*>(acc_out + h * DV + c) = a;
  }
}

constexpr int kMergeThreads = 256;
constexpr int kMergeMaxHeads = 16;     // query heads of one pair per merge CTA, at most
constexpr int kMergeSlotsPerLoad = 4;  // slots whose states a merge thread loads at once

// Merges the slots of up to kBranches branches for heads h0 .. h0 + heads - 1 of one pair and writes
// out[i][c] = sum_b gate[b][i] * (softmax-merged output of branch b of head h0 + i)[c] as bf16 (out:
// head h0's row, rows dv apart); a branch with no rows contributes 0. Branch b owns slots
// [begin[b], begin[b + 1]). gate: [kBranches][heads] in shared memory, written by the caller (this
// function synchronises before reading it). Two phases:
//   1. a team of lanes per (branch, head) reduces the branch's slots to coef = (max m, gate / sum);
//   2. threads are (slot group, head, 4 columns): each walks every groups-th slot with its (m, l) and
//      16-byte acc loads issued four slots at a time, all independent (an empty slot's stale acc is
//      loaded and then not used), and the groups add up through shared memory.
// Several heads share a CTA when that adds no round of loads (MergeHeadsPerCta): with many pairs and
// few slots, one CTA per few heads instead of one per head. Needs blockDim.x == kMergeThreads,
// 1 <= heads <= kMergeMaxHeads, heads * dv / 4 <= kMergeThreads, dv % 4 == 0. Every thread must call
// it.
template <int kBranches>
__device__ void MergeBranches(const PartialStates& ps, int pair, int h0, int heads, const int (&begin)[kBranches + 1],
                              const float* gate, bf16* out) {
  __shared__ float2 coef[kBranches * kMergeMaxHeads];
  __shared__ float4 red[kMergeThreads];
  const int G = ps.G, dv = ps.dv;
  const float2* ml = ps.ml + ps.Index(pair, 0) + h0;  // slot s, head h0 + i: ml[s * G + i]
  __syncthreads();
  const int items = kBranches * heads;
  int team = kWarpSize;  // lanes per (branch, head): whole warps take part (items * team >= 32)
  while (team > 1 && team * items > kMergeThreads) team /= 2;
  if (static_cast<int>(threadIdx.x) < items * team) {
    const int item = threadIdx.x / team, lane = threadIdx.x % team;
    const int b = item / heads, i = item - b * heads;
    float m = -INFINITY;
    for (int s = begin[b] + lane; s < begin[b + 1]; s += team) {
      const float2 v = ml[s * G + i];
      if (v.y > 0.0f) m = fmaxf(m, v.x);
    }
    for (int o = team / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o, team));
    float l = 0.0f;
    for (int s = begin[b] + lane; s < begin[b + 1]; s += team) {
      const float2 v = ml[s * G + i];
      if (v.y > 0.0f) l += v.y * Exp2Ftz(v.x - m);
    }
    for (int o = team / 2; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o, team);
    if (lane == 0) coef[item] = make_float2(m, l > 0.0f ? gate[item] / l : 0.0f);
  }
  __syncthreads();
  const int cols4 = dv / 4, per_group = heads * cols4, groups = kMergeThreads / per_group;
  const int g = threadIdx.x / per_group, r = threadIdx.x - g * per_group;
  const int i = r / cols4, c = (r - i * cols4) * 4;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  if (g < groups) {
    const int slots = begin[kBranches];
    const float* acc = ps.acc + (ps.Index(pair, 0) + h0 + i) * dv + c;
    const int64_t slot_stride = static_cast<int64_t>(G) * dv;
    for (int s0 = g; s0 < slots; s0 += kMergeSlotsPerLoad * groups) {
      float2 v[kMergeSlotsPerLoad];
      float4 x[kMergeSlotsPerLoad];
#pragma unroll
      for (int u = 0; u < kMergeSlotsPerLoad; ++u) {
        const int s = s0 + u * groups;
        v[u] = s < slots ? ml[s * G + i] : make_float2(0.f, 0.f);
        x[u] = s < slots ? *reinterpret_cast<const float4*>(acc + s * slot_stride) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < kMergeSlotsPerLoad; ++u) {
        if (v[u].y > 0.0f) {  // a select, never a multiply: an empty slot's acc may be anything
          const int s = s0 + u * groups;
          int b = 0;
#pragma unroll
          for (int k = 1; k < kBranches; ++k) b += s >= begin[k];
          const float2 cf = coef[b * heads + i];
          const float w = cf.y * Exp2Ftz(v[u].x - cf.x);
          o.x += w * x[u].x;
          o.y += w * x[u].y;
          o.z += w * x[u].z;
          o.w += w * x[u].w;
        }
      }
    }
  }
  if (groups > 1) {
    red[threadIdx.x] = o;
    __syncthreads();
    if (g == 0) {
      for (int k = 1; k < groups; ++k) {
        const float4 y = red[k * per_group + r];
        o.x += y.x;
        o.y += y.y;
        o.z += y.z;
        o.w += y.w;
      }
    }
  }
  if (g == 0) {
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(out + i * dv + c);
    dst[0] = __floats2bfloat162_rn(o.x, o.y);
    dst[1] = __floats2bfloat162_rn(o.z, o.w);
  }
}

// ---- Host side ----------------------------------------------------------------------------------

__host__ inline int CeilDiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
__host__ inline size_t AlignUp(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

// Chunks per split when every pair has about `chunks` chunks (dense decode; NSA compressed chunks;
// NSA selected rows), or `forced` (> 0): one full wave of `ctas_per_wave` CTAs split evenly over
// `pairs`, so that all CTAs run at once, each streams a long run (its start-up latency is paid once),
// and they finish together. Never more than kMaxSplits splits. Sequences much shorter than
// max_context leave their CTAs idle early: a ragged batch would want a finer cut.
__host__ inline int ChunksPerSplitOneWave(int chunks, int64_t pairs, int ctas_per_wave, int forced) {
  int64_t cps = forced;
  if (forced <= 0) {
    const int64_t per_pair = pairs < ctas_per_wave ? ctas_per_wave / pairs : 1;
    cps = (chunks + per_pair - 1) / per_pair;
  }
  if (cps < 1) cps = 1;
  if (chunks > 0 && CeilDiv(chunks, cps) > kMaxSplits) cps = CeilDiv(chunks, kMaxSplits);
  return static_cast<int>(cps);
}

// Heads per merge CTA (a power of 2 dividing G, at most kMergeMaxHeads, whose (head, 4 columns) items
// fit the threads): as many as add no round of loads to a thread's walk over the slots. One head per
// CTA when slots are many (few pairs); up to 16 when there are one or two per branch (many pairs),
// which turns several waves of CTAs into one.
__host__ inline int MergeHeadsPerCta(int G, int dv, int slots) {
  auto rounds = [&](int h) {
    const int groups = kMergeThreads / (h * (dv / 4));
    return CeilDiv(slots, static_cast<int64_t>(kMergeSlotsPerLoad) * groups);
  };
  int h = 1;
  while (2 * h <= kMergeMaxHeads && G % (2 * h) == 0 && 2 * h * (dv / 4) <= kMergeThreads && rounds(2 * h) <= rounds(h)) {
    h *= 2;
  }
  return h;
}

// Launches `kernel` with programmatic stream serialisation: it may start while the previous kernel of
// the stream drains and must call WaitForPrerequisiteGrids() before reading what that kernel wrote.
template <class... KernelArgs, class... Args>
cudaError_t LaunchWithPdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  cudaError_t e = cudaLaunchKernelEx(&config, kernel, args...);
  if (e == cudaErrorNotSupported) {  // no PDL here: an ordinary launch (the waits are then no-ops)
    cudaGetLastError();
    config.numAttrs = 0;
    e = cudaLaunchKernelEx(&config, kernel, args...);
  }
  return e;
}

// Tensor maps of one paged pool for TmaRows: K and V of the layer `cache` points at as [rows][d]
// matrices, [kRows][64] boxes, 128-byte swizzle. Built on the host (cuTensorMapEncodeTiled through
// the runtime's driver entry point: no link to libcuda) and passed in a __grid_constant__ kernel
// argument. false (use cp.async) unless the device is sm_90+, the pool's page count is known, pages
// are whole chunks (page_rows a multiple of kRows, no ring), K and V pages have the same rows per
// page in the map, and the map has < 2^31 rows.
struct CacheBoxMaps {
  CUtensorMap k;
  CUtensorMap v;
  int rows_per_page = 0;
};

// TmaRows of one (sequence, KV head) of pool `c` with maps `m` (which must live in a kernel argument).
__device__ __forceinline__ TmaRows PagedBoxRows(const PagedKvCache& c, const CacheBoxMaps& m, int seq,
                                                int kv_head) {
  TmaRows r;
  r.k_map = &m.k;
  r.v_map = &m.v;
  r.table = c.page_table + static_cast<int64_t>(seq) * c.table_stride;
  r.page_rows = c.page_rows;
  r.rows_per_page = m.rows_per_page;
  r.head_row = kv_head * c.page_rows;
  return r;
}

__host__ inline bool EncodeRowBoxMap(const void* base, int64_t rows, int d, CUtensorMap* map) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0 || d % 64 != 0) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(d) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(kRows)};
  const cuuint32_t step[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, step,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

__host__ inline bool MakeCacheBoxMaps(const PagedKvCache& c, int num_kv_heads, int dk, int dv, CacheBoxMaps* out) {
  if (c.num_pages < 1 || c.ring_pages != 0 || c.page_rows % kRows != 0 || dk % 64 != 0 || dv % 64 != 0) return false;
  if (c.k_page_stride % dk != 0 || c.v_page_stride % dv != 0 || c.k_page_stride / dk != c.v_page_stride / dv) {
    return false;
  }
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9) {
    cudaGetLastError();
    return false;
  }
  const int64_t rows_per_page = c.k_page_stride / dk;
  const int64_t rows =
      (static_cast<int64_t>(c.num_pages) - 1) * rows_per_page + static_cast<int64_t>(num_kv_heads) * c.page_rows;
  if (rows > INT32_MAX) return false;
  out->rows_per_page = static_cast<int>(rows_per_page);
  return EncodeRowBoxMap(c.k, rows, dk, &out->k) && EncodeRowBoxMap(c.v, rows, dv, &out->v);
}

// Resident CTAs of `kernel` (kThreads threads, `smem` dynamic bytes) per wave over the device; sets
// the kernel's dynamic shared memory limit first. 0 on error.
template <class Kernel>
int CtasPerWave(Kernel kernel, size_t smem) {
  if (AllowDynamicSmem(kernel, smem) != cudaSuccess) return 0;
  int device = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess) return 0;
  return sms * (per_sm > 0 ? per_sm : 1);
}

}  // namespace needle::kernels::detail::splitkv
