// A deliberately simple reference forward pass of a whole model (llama, nsa, llama-nsa, nsa-paper),
// written from docs/nsa-inference.md alone, for tests to compare the engine's executors against. It
// works on contiguous per-sequence arrays in double precision, layer by layer over the whole sequence,
// position by position from the formulas: no pages, no caches, no chunking, nothing incremental. It
// must not share code with the engine's executors or kernels/reference (independence is its purpose);
// it only reads ModelWeights/ModelConfig. Obviously correct beats fast: O(T * context) per layer.
//
// The pieces the forward pass is built from are exposed so tests can check them on hand-computed cases.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/model_config.h"
#include "engine/weights.h"

namespace needle::testing {

// One sequence's rows: [len][heads][dim], double, row-major.
struct SeqTensor {
  int64_t len = 0;
  int heads = 0;
  int dim = 0;
  std::vector<double> data;

  SeqTensor() = default;
  SeqTensor(int64_t len, int heads, int dim)
      : len(len), heads(heads), dim(dim), data(static_cast<size_t>(len * heads * dim), 0.0) {}
  double* at(int64_t t, int h) { return data.data() + (t * heads + h) * dim; }
  const double* at(int64_t t, int h) const { return data.data() + (t * heads + h) * dim; }
};

// N_c(t): how many compressed tokens i satisfy i*d + l - 1 <= t (counted, not from a closed form).
int64_t NumVisibleCompressed(const engine::NsaParams& nsa, int64_t t);

// |[a0, a1) ∩ [b0, b1)|, 0 when disjoint.
int64_t IntervalOverlap(int64_t a0, int64_t a1, int64_t b0, int64_t b1);

// One head's selection-block scores for query t: one entry per candidate block 0..t/l'.
// `probs` are the head's compression-branch probabilities over the N_c(t) visible compressed tokens.
// l = d = l': score[j] = probs[j]; otherwise score[j] = sum_i probs[i] * |[i*d, i*d+l) ∩ block j| / d.
std::vector<double> BlockScores(const engine::NsaParams& nsa, int64_t t, const std::vector<double>& probs);

// The selection blocks of one KV group for query t, ascending. `head_probs` is [G][N_c(t)]: each head's
// compression probabilities. Group score = sum of the heads' BlockScores. Forced blocks (the first
// forced_initial, the forced_local most recent) are always taken and count toward num_selected; the
// remaining slots go to the highest group scores, ties to the lower block index. With at most
// num_selected candidate blocks, all are selected.
std::vector<int64_t> SelectBlocks(const engine::NsaParams& nsa, int64_t t,
                                  const std::vector<std::vector<double>>& head_probs);

// First window key of query t: max(0, t - window + 1). The window is [WindowStart, t].
int64_t WindowStart(int window, int64_t t);

// Rotate-half RoPE in place on one head vector of `dim` (even) entries: pairs (i, i + dim/2),
// inv_freq[i] = theta^(-2i/dim) rounded to float, angle = float(pos) * inv_freq in float precision.
void ApplyRope(double* x, int dim, int64_t pos, double theta);

// Softmax attention of query q (k.dim entries) over the given rows of KV head `kv_head`, with `scale`.
// Returns v.dim entries; all zeros when `rows` is empty. When `probs` is given it receives the
// attention probabilities, one per row (empty when `rows` is).
std::vector<double> Attend(const double* q, const SeqTensor& k, const SeqTensor& v, int kv_head,
                           const std::vector<int64_t>& rows, double scale,
                           std::vector<double>* probs = nullptr);

// nsa-paper's compression MLP for the block of x's KV head `kv_head` starting at `first_row`:
// X = rows [first_row, first_row + l) ([l][dim]); returns fc2 · silu(fc1 · flatten(X + pos)),
// flatten row-major (index r*dim + c). pos: [l, dim], fc1: [hidden_c, l*dim], fc2: [out, hidden_c].
std::vector<double> CompressMlp(const engine::Tensor& pos, const engine::Tensor& fc1,
                                const engine::Tensor& fc2, const SeqTensor& x, int kv_head,
                                int64_t first_row);

// Logits [T][vocab] for every position of `tokens`. Throws std::invalid_argument on tokens out of
// range or tensors whose sizes don't match the config.
std::vector<std::vector<float>> NaiveForward(const engine::ModelWeights& w,
                                             const std::vector<int32_t>& tokens);

}  // namespace needle::testing
