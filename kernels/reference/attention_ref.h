// Naive CPU reference for NSA's attention pieces and dense attention, for one query position and one
// KV group (the G query heads sharing a KV head). fp32 inputs, double accumulation. These functions
// are the definition the CPU executor runs and the GPU kernels are tested against; they know nothing
// of requests, sequences or pools beyond the KvRows they are handed.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/reference/kv_rows.h"

namespace needle::kernels::reference {

// A half-open range of key rows [begin, end).
struct RowRange {
  int64_t begin;
  int64_t end;
};

// NSA geometry the reference needs (mirrors engine::NsaParams without depending on the engine).
struct NsaGeometry {
  int cmp_block;       // l
  int cmp_stride;      // d
  int sel_block;       // l'
  int num_selected;    // n, forced blocks included
  int forced_initial;  // blocks 0..forced_initial-1 always selected
  int forced_local;    // the forced_local most recent blocks always selected
  int window;          // w (0: no window branch)
  int topk_merge_chunk = 0;  // 0: exact top-n; C: fla-org's chunked merge (see SelectBlocks)

  int64_t NumCompressed(int64_t t) const {
    return t + 1 < cmp_block ? 0 : (t + 1 - cmp_block) / cmp_stride + 1;
  }
};

// Softmax attention of G query heads over the union of `ranges` of key rows (one softmax across all
// of them). q: [G][dk] (row stride dk); out: [G][dv]. lse (optional): [G] natural-log sum of
// exp(scale * q.k). With no keys at all, out = 0 and lse = -inf.
void AttendRanges(const float* q, int G, int dk, int dv, const KvRows& k, const KvRows& v,
                  const RowRange* ranges, int num_ranges, float scale, float* out, double* lse);

// Compressed branch for query t: attention over compressed rows [0, N_c(t)).
inline int64_t CompressedRows(const NsaGeometry& g, int64_t t) { return g.NumCompressed(t); }

// Selection-block importance for query t, summed over the G heads of the group:
// p_h[i] = exp(scale * q_h.kc_i - lse_h) over the N_c(t) visible compressed tokens, mapped to blocks
// 0..t/l' (identity when l = d = l', else overlap weights |[i*d, i*d+l) ∩ block j| / d).
// Returns one score per block.
std::vector<double> BlockScores(const float* q, int G, int dk, const KvRows& kc, int64_t t,
                                const double* lse, float scale, const NsaGeometry& g);

// The selected blocks for query t given the group's block scores: forced blocks, then the highest
// scores among the rest (ties to the lower index), n in all (or every block if there are fewer).
// With topk_merge_chunk = C > 0 and n > C/2, the fla-org Triton top-k is reproduced instead: blocks
// are ranked in chunks of C and only the best C/2 of all chunks before the current block's chunk
// survive to compete with the best C/2 of that chunk. Returned in ascending block order.
std::vector<int64_t> SelectBlocks(const std::vector<double>& scores, int64_t t, const NsaGeometry& g);

// Key ranges of the selected blocks masked to positions <= t.
std::vector<RowRange> SelectedRanges(const std::vector<int64_t>& blocks, int64_t t, int sel_block);

// Window keys for query t: [max(0, t - w + 1), t + 1).
inline RowRange WindowRange(int64_t t, int w) { return {t - w + 1 > 0 ? t - w + 1 : 0, t + 1}; }

// The whole NSA attention for one query position t and one KV group: the three branches, gated.
// q: [G][dk] post-RoPE; gates: [G][3] already sigmoided, order (cmp, slc, win); out: [G][dv].
// kc/vc: compressed rows; ks/vs: selection-branch raw rows; kw/vw: window-branch raw rows.
struct NsaBranchRows {
  KvRows kc, vc, ks, vs, kw, vw;
};
void NsaAttention(const float* q, const float* gates, int G, int dk, int dv, const NsaBranchRows& rows,
                  int64_t t, float scale, const NsaGeometry& g, float* out,
                  std::vector<int64_t>* selected_blocks = nullptr);

// Dense causal attention for query t: keys [0, t].
void DenseAttention(const float* q, int G, int dk, int dv, const KvRows& k, const KvRows& v, int64_t t,
                    float scale, float* out);

}  // namespace needle::kernels::reference
