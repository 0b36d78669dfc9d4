// NSA prefill, tensor-core path: the kernel behind LaunchNsaPrefill for the head dims the split-KV
// tiles support (kernels/split_kv_attention.cuh). One CTA of splitkv::kThreads (128) threads per
// (query token, KV head) runs every branch of that query group, with no workspace:
//
//   1. Compressed branch: splitkv::AttendChunks over the N_c(t) compressed tokens, the G heads as the
//      rows of 16-row MMA tiles, in chunks cut at selection-block boundaries exactly as the NSA
//      split-KV decode cuts them (CmpBlocksPerChunk; each chunk also loads the earlier
//      tokens that overlap its first block, scored but not attended). After each chunk the score
//      tile is folded into per-head log2 block masses lb[h][j] in shared memory (for l = d = l' the
//      scores go straight to lb through the ScoreSink's rows). The branch leaves each head's (max,
//      sum) and unnormalised output in shared memory. Where G x max_blocks masses do not fit (long
//      contexts: past ~96k positions at the paper geometry) the branch runs twice instead: once for
//      its output and log-sum-exps, once more (ScoreBlocksSecondPass) to turn each chunk's masses
//      into block scores directly.
//   2. Block scores score[j] = sum_h exp2(lb[h][j] - lse_h), then NsaTopBlocks (forced blocks,
//      ties to the lower index, fla-org's chunked merge), the same routine the simple kernel runs.
//   3. Selected branch over the selected blocks' rows <= t, window branch over rows
//      max(0, t - w + 1)..t (rows >= start from the chunk buffers when the window is a ring), each
//      an AttendChunks call; each branch's normalised output, times its gate, is added to a [G][DV]
//      f32 accumulator in shared memory, written to out as bf16 at the end.
//
// CUDA only; included by kernels/nsa_prefill.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/attention_common.cuh"
#include "kernels/nsa_compressed_chunks.cuh"
#include "kernels/nsa_prefill.h"
#include "kernels/split_kv_attention.cuh"

namespace needle::kernels::detail::nsa_prefill_tc {

using namespace nsa_chunks;  // NOLINT: the compressed-branch chunk geometry shared with the decode
using splitkv::ChunkRange;
using splitkv::kRows;
constexpr int kThreads = splitkv::kThreads;

// Where everything lives in the CTA's dynamic shared memory (byte offsets), for one launch.
struct Layout {
  int max_blocks = 0;        // selection blocks of a query at max_context - 1
  int lb_stride = 0;         // floats per head row of lb (max_blocks rounded up to 4)
  int blocks_per_chunk = 0;  // selection blocks per compressed chunk
  bool score = false;        // some query has more blocks than n
  bool identity = false;     // l = d = l': compressed token j is block j
  // Long contexts, whose per-head block masses (G x max_blocks floats) do not fit on chip: the
  // compressed branch is attended twice, first for its output and log-sum-exps, then again to score
  // each chunk's blocks into `scores` directly (chunk_lb: the chunk's [G][blocks_per_chunk] masses).
  bool two_pass = false;
  size_t tile = 0, lb = 0, chunk_lb = 0, lse = 0, scores = 0, out_acc = 0, acc = 0, ml = 0, gate = 0, sel = 0,
         bytes = 0;
};

template <int DK, int DV>
inline Layout MakeLayout(const NsaPrefillParams& p, bool two_pass) {
  const NsaKernelGeometry& g = p.geometry;
  const int G = p.num_heads / p.num_kv_heads;
  Layout L;
  L.max_blocks = NsaMaxBlocks(p.max_context, g.sel_block);
  L.lb_stride = (L.max_blocks + 3) / 4 * 4;
  L.blocks_per_chunk = CmpBlocksPerChunk(g);
  L.score = L.max_blocks > g.num_selected;
  L.identity = g.cmp_block == g.cmp_stride && g.cmp_stride == g.sel_block;
  L.two_pass = two_pass && L.score;
  auto align = [](size_t x) { return (x + 15) & ~static_cast<size_t>(15); };
  size_t at = splitkv::Tile<DK, DV>::kAuxOffset;
  L.tile = at;
  if (L.score && (!L.identity || L.two_pass)) {
    at += align(static_cast<size_t>(splitkv::HeadTiles(G)) * 16 * splitkv::kScoreStride * 4);
  }
  L.lb = at;
  if (L.score && !L.two_pass) at += align(static_cast<size_t>(G) * L.lb_stride * 4);
  L.chunk_lb = at;
  if (L.two_pass) at += align(static_cast<size_t>(G) * (L.blocks_per_chunk > 0 ? L.blocks_per_chunk : 1) * 4);
  L.lse = at;
  if (L.two_pass) at += align(static_cast<size_t>(G) * 4);
  L.scores = at;
  if (L.score) at += align(static_cast<size_t>(L.lb_stride) * 4);
  L.out_acc = at;
  at += align(static_cast<size_t>(G) * DV * 4);
  // A branch's merged state (acc [G][DV], ml [G]) lives in the pipeline buffers past AttendChunks'
  // merge scratch: they are free once its last chunk is consumed, and the next call starts with a
  // barrier after the state has been read. Elsewhere if it does not fit there.
  using T = splitkv::Tile<DK, DV>;
  const size_t state = align(static_cast<size_t>(G) * DV * 4) + align(static_cast<size_t>(G) * 8);
  const size_t in_pipe = align(T::kMergeBytes);
  if (in_pipe + state <= T::kPipeBytes) {
    L.acc = in_pipe;
    L.ml = in_pipe + align(static_cast<size_t>(G) * DV * 4);
  } else {
    L.acc = at;
    L.ml = at + align(static_cast<size_t>(G) * DV * 4);
    at += state;
  }
  L.gate = at;
  at += align(static_cast<size_t>(G) * 3 * 4);
  L.sel = at;
  at += align(static_cast<size_t>(g.num_selected) * 4);
  L.bytes = at;
  return L;
}

// out_acc[h][c] += gate[h][branch] * acc[h][c] / l_h for the heads with rows (l_h > 0). Call after a
// barrier that follows AttendChunks; returns synchronised.
template <int DV>
__device__ __forceinline__ void AddGated(int G, int branch, const float* gate, const float2* ml, const float* acc,
                                         float* out_acc) {
  __syncthreads();
  for (int i = threadIdx.x; i < G * DV; i += kThreads) {
    const int h = i / DV;
    const float2 v = ml[h];
    if (v.y > 0.0f) out_acc[i] += gate[3 * h + branch] * (acc[i] / v.y);
  }
  __syncthreads();
}

// The second pass over the compressed branch of a long context (Layout::two_pass), after the first
// attended it for its output: attends the chunks cut at block boundaries (chunk_of, as the one-pass
// kernel cuts them) again and turns each chunk's block masses into normalised block scores, summed
// over the G heads, in scores[0, nb), with the first pass's log-sum-exps (from ml, read before the
// pass overwrites it). ml/acc: the branch state's shared memory (this pass's own state, unused).
// Every thread must call it.
template <int DK, int DV, class ChunkOf>
__device__ void ScoreBlocksSecondPass(const NsaPrefillParams& p, const Layout& L, const bf16* q, const RowSource& src,
                                      ChunkOf chunk_of, int nb, int64_t nc, float scale_log2, float2* ml, float* acc,
                                      float* scores) {
  extern __shared__ __align__(16) char smem[];
  const NsaKernelGeometry& geo = p.geometry;
  const int G = p.num_heads / p.num_kv_heads, B = L.blocks_per_chunk;
  const TokenGrid grid = TokenGrid::Of(geo);
  float* lse = reinterpret_cast<float*>(smem + L.lse);
  for (int h = threadIdx.x; h < G; h += kThreads) lse[h] = ml[h].x + log2f(ml[h].y);  // every head has rows
  // (AttendChunks starts with a barrier: lse is complete before the first chunk's hook reads it.)
  float* tile = reinterpret_cast<float*>(smem + L.tile);
  float* chunk_lb = reinterpret_cast<float*>(smem + L.chunk_lb);
  splitkv::ScoreSink sink;
  sink.tile = tile;
  auto block_scores = [&](int c, const ChunkRange& r) {
    const int ja = c * B, nblk = min(ja + B, nb) - ja;
    if (L.identity) {  // block j's mass is compressed token j's score; none yet for j >= nc
      for (int i = threadIdx.x; i < G * nblk; i += kThreads) {
        const int h = i / nblk, j = ja + (i - h * nblk);
        chunk_lb[h * B + j - ja] = j < nc ? tile[h * splitkv::kScoreStride + j - r.score_begin] : -INFINITY;
      }
    } else {
      BlockMasses(geo, grid, G, tile, ja, nblk, r, chunk_lb, B, ja);
    }
    __syncthreads();
    for (int jl = threadIdx.x; jl < nblk; jl += kThreads) {
      float s = 0.0f;
      for (int h = 0; h < G; ++h) s += exp2f(chunk_lb[h * B + jl] - lse[h]);
      scores[ja + jl] = s;
    }
  };
  splitkv::AttendChunks<DK, DV>(q, G, scale_log2, src, (nb + B - 1) / B, chunk_of, [](int64_t f) { return f; }, smem,
                                sink, block_scores, ml, acc);
  __syncthreads();  // scores are complete; the caller's next step reads them
}

// kTwoPass: instantiated apart (Layout::two_pass), so the one-pass kernel keeps its registers.
template <int DK, int DV, bool kTwoPass>
__global__ void __launch_bounds__(kThreads, 1) NsaPrefillTcKernel(const NsaPrefillParams p, const Layout L) {
  extern __shared__ __align__(16) char smem[];
  __shared__ int num_sel;
  const NsaKernelGeometry& geo = p.geometry;
  const int token = blockIdx.x, kv_head = blockIdx.y;
  const int seq = FindSequence(p.cu_tokens, p.num_seqs, token);
  const int G = p.num_heads / p.num_kv_heads;
  const int64_t head0 = static_cast<int64_t>(token) * p.num_heads + static_cast<int64_t>(kv_head) * G;
  const int64_t start = p.start_pos[seq];
  const int64_t t = start + (token - p.cu_tokens[seq]);
  const bf16* q = p.q + head0 * DK;
  bf16* out = p.out + head0 * DV;
  int32_t* selected = p.selected_blocks == nullptr
                          ? nullptr
                          : p.selected_blocks + (static_cast<int64_t>(token) * p.num_kv_heads + kv_head) * geo.num_selected;
  const int64_t lp = geo.sel_block;
  const int n = geo.num_selected;
  if (t < 0 || t / lp + 1 > L.max_blocks) {  // uniform across the CTA: the caller's max_context was wrong
    for (int i = threadIdx.x; i < G * DV; i += kThreads) out[i] = __float2bfloat16(NAN);
    if (selected != nullptr) {
      for (int i = threadIdx.x; i < n; i += kThreads) selected[i] = -1;
    }
    return;
  }
  const int nb = static_cast<int>(t / lp + 1);
  const int64_t nc = NumCompressed(geo, t);
  float* tile = reinterpret_cast<float*>(smem + L.tile);
  float* lb = reinterpret_cast<float*>(smem + L.lb);
  float* scores = reinterpret_cast<float*>(smem + L.scores);
  float* out_acc = reinterpret_cast<float*>(smem + L.out_acc);
  float* acc = reinterpret_cast<float*>(smem + L.acc);
  float2* ml = reinterpret_cast<float2*>(smem + L.ml);
  float* gate = reinterpret_cast<float*>(smem + L.gate);
  int32_t* sel = reinterpret_cast<int32_t*>(smem + L.sel);
  const void* gates = GatesAt(p.gates, p.gate_dtype, head0);
  for (int i = threadIdx.x; i < G * DV; i += kThreads) out_acc[i] = 0.0f;
  for (int i = threadIdx.x; i < 3 * G; i += kThreads) gate[i] = LoadGate(gates, p.gate_dtype, i);
  const float scale_log2 = p.softmax_scale * splitkv::kLog2e;
  auto same_row = [](int64_t f) { return f; };
  auto no_scores = [](int, const ChunkRange&) {};

  // 1. Compressed branch, chunks cut at selection-block boundaries. On long contexts
  // (Layout::two_pass) the first pass attends it without scores and a second pass scores the blocks.
  const bool scoring = nb > n && nc > 0;
  const bool score_now = scoring && !kTwoPass;
  {
    const int B = L.blocks_per_chunk;
    const int chunks = (nb + B - 1) / B;
    const TokenGrid grid = TokenGrid::Of(geo);
    auto chunk_of = [=](int c) {
      int ja, jb;
      return CompressedChunk(geo, grid, B, c, nb, static_cast<int>(nc), &ja, &jb);
    };
    splitkv::ScoreSink sink;
    const RowSource src = PagedRows(p.compressed, seq, kv_head, DK, DV);
    if (score_now && L.identity) {
      sink.rows = lb;
      sink.row_stride = L.lb_stride;
      // Blocks with no complete compressed token yet (the current one) have no mass.
      for (int i = threadIdx.x; i < (nb - nc) * G; i += kThreads) {
        lb[(i % G) * L.lb_stride + nc + i / G] = -INFINITY;
      }
    } else if (score_now) {
      sink.tile = tile;
    }
    auto block_masses = [&](int c, const ChunkRange& r) {
      const int ja = c * B;
      BlockMasses(geo, grid, G, tile, ja, min(ja + B, nb) - ja, r, lb, L.lb_stride);
    };
    // Without scores the chunking only needs to cover the nc tokens: one chunk per kRows.
    const int count = score_now ? chunks : static_cast<int>((nc + kRows - 1) / kRows);
    if (score_now) {
      splitkv::AttendChunks<DK, DV>(q, G, scale_log2, src, count, chunk_of, same_row, smem, sink, block_masses, ml,
                                    acc);
    } else {
      auto plain_chunk = [=](int c) {
        const int64_t b = static_cast<int64_t>(c) * kRows;
        return ChunkRange{b, b, MinI64(nc, b + kRows)};
      };
      splitkv::AttendChunks<DK, DV>(q, G, scale_log2, src, count, plain_chunk, same_row, smem, splitkv::ScoreSink{},
                                    no_scores, ml, acc);
    }
    AddGated<DV>(G, 0, gate, ml, acc, out_acc);
    if (kTwoPass && scoring) ScoreBlocksSecondPass<DK, DV>(p, L, q, src, chunk_of, nb, nc, scale_log2, ml, acc, scores);
  }

  // 2. Block selection: every block when there are at most n, else scores and top-n.
  if (nb <= n) {
    for (int j = threadIdx.x; j < nb; j += kThreads) sel[j] = j;
    if (threadIdx.x == 0) num_sel = nb;
    __syncthreads();
  } else {
    if (kTwoPass && scoring) {
      // scores are complete (the second pass)
    } else if (scoring) {
      // lse_h (log2) = m_h + log2 l_h; every head has rows here (nc > 0).
      for (int j = threadIdx.x; j < nb; j += kThreads) {
        float s = 0.0f;
        for (int h = 0; h < G; ++h) {
          const float2 v = ml[h];
          s += exp2f(lb[h * L.lb_stride + j] - (v.x + log2f(v.y)));
        }
        scores[j] = s;
      }
    } else {
      for (int j = threadIdx.x; j < nb; j += kThreads) scores[j] = 0.0f;
    }
    __syncthreads();
    NsaTopBlocks<kThreads>(geo, t, nb, scores, sel, &num_sel);
  }
  const int ns = num_sel;
  if (selected != nullptr) {
    for (int i = threadIdx.x; i < n; i += kThreads) selected[i] = i < ns ? sel[i] : -1;
  }

  // 3. Selected branch: ascending ids put the only partial block (the current one) last.
  {
    const int64_t rows = static_cast<int64_t>(ns - 1) * lp + MinI64(lp, t + 1 - static_cast<int64_t>(sel[ns - 1]) * lp);
    const int chunks = static_cast<int>((rows + kRows - 1) / kRows);
    auto chunk_of = [=](int c) {
      const int64_t b = static_cast<int64_t>(c) * kRows;
      return ChunkRange{b, b, MinI64(rows, b + kRows)};
    };
    auto selected_row = [=](int64_t f) { return static_cast<int64_t>(sel[f / lp]) * lp + f % lp; };
    splitkv::AttendChunks<DK, DV>(q, G, scale_log2, PagedRows(p.selection, seq, kv_head, DK, DV), chunks, chunk_of,
                                  selected_row, smem, splitkv::ScoreSink{}, no_scores, ml, acc);
    AddGated<DV>(G, 1, gate, ml, acc, out_acc);
  }

  // 4. Window branch: rows max(0, t - w + 1)..t.
  if (geo.window > 0) {
    RowSource win;
    if (p.shared_kv) {
      win = PagedRows(p.selection, seq, kv_head, DK, DV);
    } else {
      win = PagedRows(p.window, seq, kv_head, DK, DV);
      const int64_t first = p.cu_tokens[seq];
      win.k_tail = p.window_k_chunk + first * p.window_k_chunk_stride + static_cast<int64_t>(kv_head) * DK;
      win.v_tail = p.window_v_chunk + first * p.window_v_chunk_stride + static_cast<int64_t>(kv_head) * DV;
      win.k_tail_stride = p.window_k_chunk_stride;
      win.v_tail_stride = p.window_v_chunk_stride;
      win.tail_start = start;
    }
    const int64_t begin = MaxI64(0, t - geo.window + 1);
    const int64_t rows = t + 1 - begin;
    const int chunks = static_cast<int>((rows + kRows - 1) / kRows);
    auto chunk_of = [=](int c) {
      const int64_t b = begin + static_cast<int64_t>(c) * kRows;
      return ChunkRange{b, b, MinI64(t + 1, b + kRows)};
    };
    splitkv::AttendChunks<DK, DV>(q, G, scale_log2, win, chunks, chunk_of, same_row, smem, splitkv::ScoreSink{},
                                  no_scores, ml, acc);
    AddGated<DV>(G, 2, gate, ml, acc, out_acc);
  }

  for (int i = threadIdx.x; i < G * DV; i += kThreads) out[i] = __float2bfloat16(out_acc[i]);
}

// The tensor-core path's head dims.
template <class F>
cudaError_t DispatchHeadDims(int dk, int dv, F&& f) {
  switch (HeadDimsKey(dk, dv)) {
    case HeadDimsKey(192, 128): return f(HeadDims<192, 128>{});
    case HeadDimsKey(128, 128): return f(HeadDims<128, 128>{});
    case HeadDimsKey(64, 64): return f(HeadDims<64, 64>{});
    default: return cudaErrorInvalidValue;
  }
}

// Whether the window chunk rows can be copied in 16-byte pieces (cp.async): 16-byte aligned pointers
// and row strides (the head offsets, multiples of the head dims, are).
inline bool ChunkRowsAligned(const NsaPrefillParams& p) {
  if (p.shared_kv || p.geometry.window == 0) return true;
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return aligned(p.window_k_chunk) && aligned(p.window_v_chunk) && p.window_k_chunk_stride % 8 == 0 &&
         p.window_v_chunk_stride % 8 == 0;
}

// The layout Launch uses for p: one pass over the compressed branch when it fits in shared memory,
// else two; false when neither fits (or the geometry cannot be chunked).
template <int DK, int DV>
inline bool ChooseLayout(const NsaPrefillParams& p, Layout* L) {
  auto fits = [](const Layout& l) {
    return l.blocks_per_chunk >= 1 && l.bytes <= static_cast<size_t>(kMaxSmemBytes) - 1024;
  };
  *L = MakeLayout<DK, DV>(p, false);
  if (!fits(*L)) *L = MakeLayout<DK, DV>(p, true);
  return fits(*L);
}

// Whether Launch applies to p (head dims, chunk alignment, geometry and shared memory); the chunk
// strides must be resolved (nonzero).
inline bool Applies(const NsaPrefillParams& p) {
  if (!ChunkRowsAligned(p)) return false;
  return DispatchHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) -> cudaError_t {
           Layout L;
           return ChooseLayout<decltype(dims)::qk, decltype(dims)::v>(p, &L) ? cudaSuccess : cudaErrorNotSupported;
         }) == cudaSuccess;
}

// Launches the tensor-core path; cudaErrorNotSupported (nothing launched) when it does not apply
// (head dims, geometry that cannot be chunked, shared memory, or window chunk rows not 16-byte
// aligned): the caller runs the simple kernel. The chunk strides must be resolved (nonzero).
inline cudaError_t Launch(const NsaPrefillParams& p, cudaStream_t stream) {
  if (!ChunkRowsAligned(p)) return cudaErrorNotSupported;
  return DispatchHeadDims(p.head_dim_qk, p.head_dim_v, [&](auto dims) -> cudaError_t {
    constexpr int kDk = decltype(dims)::qk, kDv = decltype(dims)::v;
    Layout L;
    if (!ChooseLayout<kDk, kDv>(p, &L)) return cudaErrorNotSupported;
    auto kernel = L.two_pass ? NsaPrefillTcKernel<kDk, kDv, true> : NsaPrefillTcKernel<kDk, kDv, false>;
    cudaError_t e = AllowDynamicSmem(kernel, L.bytes);
    if (e != cudaSuccess) return e;
    kernel<<<dim3(p.num_tokens, p.num_kv_heads), kThreads, L.bytes, stream>>>(p, L);
    return cudaGetLastError();
  });
}

inline bool Supported(int dk, int dv) {
  return DispatchHeadDims(dk, dv, [](auto) { return cudaSuccess; }) == cudaSuccess;
}

}  // namespace needle::kernels::detail::nsa_prefill_tc
