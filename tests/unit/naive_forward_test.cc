// Tests of the naive reference forward pass: its pieces on hand-computed cases, and whole tiny models
// whose logits at the first positions follow by hand from weights chosen to make attention trivial
// (zero queries: uniform softmax; identity value projections). The expectations are written out from
// docs/nsa-inference.md, not derived from the code under test.
#include "tests/support/naive_forward.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace needle::testing {
namespace {

using engine::Architecture;
using engine::Compression;
using engine::ModelConfig;
using engine::ModelWeights;
using engine::NsaParams;
using engine::Tensor;
using engine::TensorSpecs;
using Vec = std::vector<double>;

// ---------------------------------------------------------------------------------------------------
// Helpers

NsaParams Geometry(int l, int d, int lp, int n, int forced_initial, int forced_local, int window) {
  NsaParams p;
  p.cmp_block = l;
  p.cmp_stride = d;
  p.sel_block = lp;
  p.num_selected = n;
  p.forced_initial = forced_initial;
  p.forced_local = forced_local;
  p.window = window;
  return p;
}

// A model of the config's shapes with every tensor zero (norm weights one).
ModelWeights ZeroModel(const ModelConfig& c) {
  ModelWeights w;
  w.config = c;
  w.layers.resize(c.num_layers);
  for (const engine::TensorSpec& spec : TensorSpecs(c)) {
    Tensor& t = spec.slot(w);
    t.shape = spec.shape;
    t.data.assign(static_cast<size_t>(t.numel()), 0.0f);
    if (spec.name.find("norm") != std::string::npos) t.data.assign(t.data.size(), 1.0f);
  }
  return w;
}

// A model of the config's shapes with uniform random weights (norm weights near one).
ModelWeights RandomModel(const ModelConfig& c, uint32_t seed, float scale) {
  ModelWeights w = ZeroModel(c);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  for (const engine::TensorSpec& spec : TensorSpecs(c)) {
    Tensor& t = spec.slot(w);
    const bool norm = spec.name.find("norm") != std::string::npos;
    for (float& x : t.data) x = norm ? 1.0f + 0.1f * u(rng) / scale : u(rng);
  }
  return w;
}

void Set(Tensor& t, std::vector<float> values) {
  ASSERT_EQ(static_cast<int64_t>(values.size()), t.numel()) << "tensor of the wrong size in the test";
  t.data = std::move(values);
}

double Silu(double x) { return x / (1.0 + std::exp(-x)); }
double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
Vec Add(const Vec& a, const Vec& b) { return {a[0] + b[0], a[1] + b[1]}; }
Vec Mul(double s, const Vec& a) { return {s * a[0], s * a[1]}; }
double Dot(const Vec& a, const Vec& b) { return a[0] * b[0] + a[1] * b[1]; }
// 2-d RoPE with inv_freq 1: rotation by `angle` radians.
Vec Rot(const Vec& a, double angle) {
  return {a[0] * std::cos(angle) - a[1] * std::sin(angle), a[1] * std::cos(angle) + a[0] * std::sin(angle)};
}
Vec Rms(const Vec& a, double eps) {
  double ms = 0;
  for (double x : a) ms += x * x / a.size();
  Vec r = a;
  for (double& x : r) x /= std::sqrt(ms + eps);
  return r;
}

// Every element within atol + rtol*|want|; NaN fails; the messages name position, index, worst error.
void ExpectLogits(const std::vector<std::vector<float>>& got, const std::vector<Vec>& want, double atol,
                  double rtol) {
  ASSERT_EQ(got.size(), want.size());
  double worst = 0;
  int failures = 0, worst_t = -1, worst_i = -1;
  for (size_t t = 0; t < want.size(); ++t) {
    ASSERT_EQ(got[t].size(), want[t].size()) << "position " << t;
    for (size_t i = 0; i < want[t].size(); ++i) {
      const double err = std::fabs(got[t][i] - want[t][i]);
      if (std::isnan(got[t][i]) || !(err <= atol + rtol * std::fabs(want[t][i]))) {
        ++failures;
        ADD_FAILURE() << "position " << t << " index " << i << ": got " << got[t][i] << " want " << want[t][i];
      }
      if (std::isnan(err) || err > worst) {
        worst = std::isnan(err) ? INFINITY : err, worst_t = static_cast<int>(t), worst_i = static_cast<int>(i);
      }
    }
  }
  EXPECT_EQ(failures, 0) << "worst error " << worst << " at position " << worst_t << " index " << worst_i;
}

// ---------------------------------------------------------------------------------------------------
// Index arithmetic

TEST(NaiveNumCompressed, EdgesOfThePaperGeometry) {
  const NsaParams p = Geometry(32, 16, 64, 16, 1, 2, 512);
  EXPECT_EQ(NumVisibleCompressed(p, 0), 0);
  EXPECT_EQ(NumVisibleCompressed(p, 30), 0);  // t = l - 2
  EXPECT_EQ(NumVisibleCompressed(p, 31), 1);  // t = l - 1: [0, 32) complete
  EXPECT_EQ(NumVisibleCompressed(p, 46), 1);
  EXPECT_EQ(NumVisibleCompressed(p, 47), 2);  // t = l - 1 + d: [16, 48) complete
  EXPECT_EQ(NumVisibleCompressed(p, 266), 15);
}

TEST(NaiveNumCompressed, MatchesTheClosedFormEverywhere) {
  for (const NsaParams& p : {Geometry(32, 16, 64, 16, 1, 2, 512), Geometry(8, 8, 8, 4, 1, 2, 16),
                             Geometry(2, 1, 2, 1, 0, 1, 0), Geometry(12, 4, 8, 4, 1, 1, 5)}) {
    for (int64_t t = 0; t < 400; ++t) {
      const int64_t closed = t + 1 < p.cmp_block ? 0 : (t + 1 - p.cmp_block) / p.cmp_stride + 1;
      ASSERT_EQ(NumVisibleCompressed(p, t), closed) << "l=" << p.cmp_block << " d=" << p.cmp_stride << " t=" << t;
    }
  }
}

TEST(NaiveWindow, Boundaries) {
  EXPECT_EQ(WindowStart(4, 0), 0);
  EXPECT_EQ(WindowStart(4, 3), 0);  // t = w - 1: exactly w keys 0..3
  EXPECT_EQ(WindowStart(4, 4), 1);
  EXPECT_EQ(WindowStart(4, 10), 7);  // keys 7..10
  EXPECT_EQ(WindowStart(1, 5), 5);   // the query alone
}

TEST(NaiveOverlap, Intervals) {
  EXPECT_EQ(IntervalOverlap(0, 32, 0, 64), 32);
  EXPECT_EQ(IntervalOverlap(48, 80, 64, 128), 16);
  EXPECT_EQ(IntervalOverlap(0, 10, 10, 20), 0);
  EXPECT_EQ(IntervalOverlap(30, 40, 0, 10), 0);
}

// ---------------------------------------------------------------------------------------------------
// Block scores and selection

TEST(NaiveBlockScores, PaperOverlapWeightsAre12221) {
  const NsaParams p = Geometry(32, 16, 64, 16, 1, 2, 512);
  const int64_t t = 64 * 4 + 10;  // blocks 0..4, N_c = 15
  ASSERT_EQ(NumVisibleCompressed(p, t), 15);
  // Compressed token i = 4j-1 .. 4j+3 contributes 1,2,2,2,1 to block j = 1 (and the outer ones 1 to
  // the neighbours).
  const double want_block1[5] = {1, 2, 2, 2, 1};
  for (int k = 0; k < 5; ++k) {
    Vec probs(15, 0.0);
    probs[3 + k] = 1.0;
    const Vec s = BlockScores(p, t, probs);
    ASSERT_EQ(s.size(), 5u);
    EXPECT_DOUBLE_EQ(s[1], want_block1[k]) << "i=" << 3 + k;
    EXPECT_DOUBLE_EQ(s[0], k == 0 ? 1.0 : 0.0) << "i=" << 3 + k;
    EXPECT_DOUBLE_EQ(s[2], k == 4 ? 1.0 : 0.0) << "i=" << 3 + k;
  }
  // Block 0 has no token i = -1: weights 2,2,2,1 from i = 0..3.
  Vec probs(15, 1.0);
  const Vec s = BlockScores(p, t, probs);
  EXPECT_DOUBLE_EQ(s[0], 7.0);
  EXPECT_DOUBLE_EQ(s[1], 8.0);
  EXPECT_DOUBLE_EQ(s[2], 8.0);
  // Block 3 = [192, 256): i = 11..14 fully visible (weights 1,2,2,2), i = 15 not yet: 7.
  EXPECT_DOUBLE_EQ(s[3], 7.0);
  // Block 4 = [256, 320): only i = 15.. would overlap it, none visible at t = 266.
  EXPECT_DOUBLE_EQ(s[4], 0.0);
}

TEST(NaiveBlockScores, IdentityMapWhenAllBlockSizesAgree) {
  const NsaParams p = Geometry(8, 8, 8, 4, 1, 2, 16);
  const int64_t t = 43;  // blocks 0..5, N_c = 5
  const Vec probs = {0.1, 0.2, 0.3, 0.15, 0.25};
  const Vec s = BlockScores(p, t, probs);
  ASSERT_EQ(s.size(), 6u);
  for (int j = 0; j < 5; ++j) EXPECT_EQ(s[j], probs[j]) << j;
  EXPECT_EQ(s[5], 0.0);  // the partial current block has no compressed token yet
}

TEST(NaiveSelectBlocks, ForcedBlocksBeatHigherScores) {
  const NsaParams p = Geometry(8, 8, 8, 4, 1, 2, 16);
  // t = 43: blocks 0..5; forced 0 (initial), 5 and 4 (local); one free slot among 1, 2, 3.
  const std::vector<Vec> probs = {{0.01, 0.09, 0.3, 0.6, 0.0}};
  EXPECT_EQ(SelectBlocks(p, 43, probs), (std::vector<int64_t>{0, 3, 4, 5}));
}

TEST(NaiveSelectBlocks, TiesGoToTheLowerIndex) {
  const NsaParams p = Geometry(8, 8, 8, 3, 0, 1, 16);  // n = 3, only the current block forced
  EXPECT_EQ(SelectBlocks(p, 43, {{0.25, 0.25, 0.25, 0.25, 0.0}}), (std::vector<int64_t>{0, 1, 5}));
  EXPECT_EQ(SelectBlocks(p, 43, {{0.1, 0.3, 0.1, 0.3, 0.2}}), (std::vector<int64_t>{1, 3, 5}));
  const NsaParams p4 = Geometry(8, 8, 8, 4, 0, 1, 16);
  EXPECT_EQ(SelectBlocks(p4, 43, {{0.2, 0.3, 0.2, 0.3, 0.0}}), (std::vector<int64_t>{0, 1, 3, 5}));
}

TEST(NaiveSelectBlocks, GroupScoreSumsTheHeads) {
  const NsaParams p = Geometry(8, 8, 8, 2, 0, 1, 16);
  // Head 0 prefers block 1 (0.6), head 1 block 2/3; summed: 1: 0.6, 2: 0.9, 3: 0.5.
  EXPECT_EQ(SelectBlocks(p, 43, {{0, 0.6, 0.4, 0, 0}, {0, 0, 0.5, 0.5, 0}}), (std::vector<int64_t>{2, 5}));
}

TEST(NaiveSelectBlocks, AllBlocksWhenAtMostN) {
  const NsaParams p = Geometry(8, 8, 8, 4, 1, 2, 16);
  EXPECT_EQ(SelectBlocks(p, 0, {{}}), (std::vector<int64_t>{0}));
  EXPECT_EQ(SelectBlocks(p, 20, {{0.5, 0.5}}), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(SelectBlocks(p, 31, {{0.9, 0.05, 0.05, 0.0}}), (std::vector<int64_t>{0, 1, 2, 3}));
  // One more block than n: now block 1 (score 0.05) loses to block 2 (0.1); 0, 3, 4 forced.
  EXPECT_EQ(SelectBlocks(p, 32, {{0.8, 0.05, 0.1, 0.05}}), (std::vector<int64_t>{0, 2, 3, 4}));
}

TEST(NaiveSelectBlocks, PaperGeometryUsesOverlapScores) {
  const NsaParams p = Geometry(32, 16, 64, 3, 1, 1, 512);
  const int64_t t = 64 * 4 + 10;  // blocks 0..4; forced 0 and 4; one free slot
  Vec probs(15, 0.0);
  probs[7] = 1.0;  // [112, 144): 1 to block 1, 1 to block 2: a tie, lower index wins
  EXPECT_EQ(SelectBlocks(p, t, {probs}), (std::vector<int64_t>{0, 1, 4}));
  probs[7] = 0.0;
  probs[8] = 1.0;  // [128, 160): 2 to block 2
  EXPECT_EQ(SelectBlocks(p, t, {probs}), (std::vector<int64_t>{0, 2, 4}));
}

// ---------------------------------------------------------------------------------------------------
// RoPE, attention, compression MLP

TEST(NaiveRope, RotateHalfPairsAndFrequencies) {
  // dim 4, theta 100: inv_freq = {1, 0.1}; pairs (0, 2) and (1, 3).
  double x[4] = {1, 2, 3, 4};
  ApplyRope(x, 4, 1, 100.0);
  const double c1 = std::cos(1.0), s1 = std::sin(1.0), c01 = std::cos(0.1), s01 = std::sin(0.1);
  EXPECT_NEAR(x[0], 1 * c1 - 3 * s1, 1e-7);
  EXPECT_NEAR(x[2], 3 * c1 + 1 * s1, 1e-7);
  EXPECT_NEAR(x[1], 2 * c01 - 4 * s01, 1e-7);
  EXPECT_NEAR(x[3], 4 * c01 + 2 * s01, 1e-7);
  double y[4] = {1, 2, 3, 4};
  ApplyRope(y, 4, 0, 100.0);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(y[i], i + 1.0);
}

TEST(NaiveAttend, EmptyRowsGiveZeroAndNoProbabilities) {
  SeqTensor k(2, 1, 2), v(2, 1, 3);
  const double q[2] = {1, 1};
  std::vector<double> probs = {42};
  const Vec o = Attend(q, k, v, 0, {}, 1.0, &probs);
  EXPECT_EQ(o, Vec(3, 0.0));
  EXPECT_TRUE(probs.empty());
}

TEST(NaiveAttend, SoftmaxOverTheGivenRows) {
  SeqTensor k(3, 2, 2), v(3, 2, 2);
  // KV head 1: k0 = (0, 0), k1 = (ln 3, 0), k2 = (100, 0) (never attended); v0 = (1, 0), v1 = (0, 2).
  k.at(1, 1)[0] = std::log(3.0);
  k.at(2, 1)[0] = 100;
  v.at(0, 1)[0] = 1;
  v.at(1, 1)[1] = 2;
  v.at(2, 1)[0] = 1000;
  k.at(1, 0)[0] = 100;  // head 0 must not be read
  const double q[2] = {2, 5};
  std::vector<double> probs;
  const Vec o = Attend(q, k, v, 1, {0, 1}, 0.5, &probs);  // scores 0 and ln 3
  ASSERT_EQ(probs.size(), 2u);
  EXPECT_NEAR(probs[0], 0.25, 1e-12);
  EXPECT_NEAR(probs[1], 0.75, 1e-12);
  EXPECT_NEAR(o[0], 0.25, 1e-12);
  EXPECT_NEAR(o[1], 1.5, 1e-12);
}

TEST(NaiveCompressMlp, FlattenRowMajorWithPositionEmbedding) {
  Tensor pos{{2, 2}, {0.1f, 0.2f, 0.3f, 0.4f}};
  Tensor fc1{{2, 4}, {1, 0, 0, 1, 0, 1, -1, 0}};
  Tensor fc2{{2, 2}, {1, 0, 0.5f, 1}};
  SeqTensor x(3, 2, 2);
  x.at(0, 1)[0] = x.at(0, 1)[1] = 9;  // before the block
  x.at(1, 1)[0] = 1, x.at(1, 1)[1] = 2, x.at(2, 1)[0] = 3, x.at(2, 1)[1] = 4;
  x.at(1, 0)[0] = 50;  // the other head
  const Vec o = CompressMlp(pos, fc1, fc2, x, 1, 1);
  // flatten(X + pos) = (1.1, 2.2, 3.3, 4.4); fc1 -> (5.5, -1.1).
  const double h0 = Silu(5.5), h1 = Silu(-1.1);
  ASSERT_EQ(o.size(), 2u);
  EXPECT_NEAR(o[0], h0, 1e-6);
  EXPECT_NEAR(o[1], 0.5 * h0 + h1, 1e-6);
}

// ---------------------------------------------------------------------------------------------------
// Whole models by hand

ModelConfig TinyConfig(Architecture arch, int hidden, int heads, int kv_heads, int dk, int dv, int vocab) {
  ModelConfig c;
  c.arch = arch;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.num_layers = 1;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim_qk = dk;
  c.head_dim_v = dv;
  c.intermediate_size = 1;
  c.norm_eps = 1e-6f;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = 4096;
  c.bos_token_id = c.eos_token_id = -1;
  return c;
}

// llama-nsa, l = d = l' = 2, n = 1 (the current block only), window 2; zero queries make every branch a
// plain mean of its values; the MLP adds (silu(hn0) * hn1, 0).
TEST(NaiveForwardByHand, LlamaNsaThreePositions) {
  ModelConfig c = TinyConfig(Architecture::kLlamaNsa, 2, 1, 1, 2, 2, 3);
  c.nsa = Geometry(2, 2, 2, 1, 0, 1, 2);
  c.nsa.compression = Compression::kMeanPostRope;
  c.nsa.shared_kv = true;
  c.nsa.cmp_mlp_hidden = 0;
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  ModelWeights w = ZeroModel(c);
  auto& L = w.layers[0];
  Set(w.embed, {1, 1, 1, -1, 2, 0.5f});
  Set(L.k_proj, {0.3f, -0.7f, 1.1f, 0.2f});  // irrelevant with zero queries
  Set(L.v_proj, {1, 0, 0, 1});
  Set(L.g_proj, {0.5f, 0, 0, -1, 1, 1});  // (cmp, slc, win) = sigmoid(0.5 n0, -n1, n0 + n1)
  Set(L.o_proj, {1, 0, 0, 1});
  Set(L.gate_proj, {1, 0});
  Set(L.up_proj, {0, 1});
  Set(L.down_proj, {1, 0});
  Set(w.lm_head, {1, 0, 0, 1, 1, 1});

  const double eps = c.norm_eps;
  const std::vector<Vec> e = {{1, 1}, {1, -1}, {2, 0.5}};
  std::vector<Vec> n;
  for (const Vec& x : e) n.push_back(Rms(x, eps));
  const Vec m01 = Mul(0.5, Add(n[0], n[1])), m12 = Mul(0.5, Add(n[1], n[2]));
  // Per position: (cmp, slc, win) branch outputs.
  //  t=0: N_c = 0 -> cmp 0; block 0 = {0}; window {0}.
  //  t=1: N_c = 1 (token 0 = mean of rows 0, 1); block 0 = {0, 1}; window {0, 1}.
  //  t=2: N_c = 1; blocks 0, 1, n = 1, the current block 1 is forced = {2}; window {1, 2}.
  const std::vector<std::vector<Vec>> branch = {
      {{0, 0}, n[0], n[0]}, {m01, m01, m01}, {m01, n[2], m12}};
  std::vector<Vec> want;
  for (int t = 0; t < 3; ++t) {
    const double gc = Sigmoid(0.5 * n[t][0]), gs = Sigmoid(-n[t][1]), gw = Sigmoid(n[t][0] + n[t][1]);
    const Vec o = Add(Add(Mul(gc, branch[t][0]), Mul(gs, branch[t][1])), Mul(gw, branch[t][2]));
    Vec h = Add(e[t], o);
    const Vec hn = Rms(h, eps);
    h[0] += Silu(hn[0]) * hn[1];
    const Vec f = Rms(h, eps);
    want.push_back({f[0], f[1], f[0] + f[1]});
  }
  ExpectLogits(NaiveForward(w, {0, 1, 2}), want, 1e-6, 1e-5);
}

// nsa-paper, l = 2, d = 1, l' = 2, n = 1 (current block), no window (its weights are huge to show it is
// absent). Cmp-branch keys are zero before the MLP, so the compressed key is the constant
// c_k = fc2 · silu(fc1 · flatten(pos)) rotated to position i*d; queries are the normed inputs, RoPE'd.
TEST(NaiveForwardByHand, NsaPaperThreePositions) {
  ModelConfig c = TinyConfig(Architecture::kNsaPaper, 2, 1, 1, 2, 2, 3);
  c.nsa = Geometry(2, 1, 2, 1, 0, 1, 0);
  c.nsa.compression = Compression::kMlpPreRope;
  c.nsa.shared_kv = false;
  c.nsa.cmp_mlp_hidden = 2;
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  c.rope_theta = 10000.0;  // dim 2: inv_freq = 1, angle = position
  ModelWeights w = ZeroModel(c);
  auto& L = w.layers[0];
  Set(w.embed, {1, 1, 1, -1, 2, 0.5f});
  Set(L.q_proj, {1, 0, 0, 1});
  Set(L.branch_v_proj[engine::kCmp], {1, 0, 0, 1});
  Set(L.branch_v_proj[engine::kSlc], {2, 0, 0, 2});
  Set(L.branch_k_proj[engine::kWin], {100, 0, 0, 100});
  Set(L.branch_v_proj[engine::kWin], {100, 0, 0, 100});
  Set(L.cmp_k_pos, {0.5f, -0.2f, 0.1f, 0.3f});
  Set(L.cmp_k_fc1, {1, 1, 0, 0, 0, 0, 1, -1});
  Set(L.cmp_k_fc2, {1, 0, 0, 2});
  Set(L.cmp_v_pos, {0.1f, 0.2f, 0.3f, 0.4f});
  Set(L.cmp_v_fc1, {1, 0, 0, 1, 0, 1, -1, 0});
  Set(L.cmp_v_fc2, {1, 0, 0.5f, 1});
  Set(L.o_proj, {1, 0, 0, 1});
  Set(w.lm_head, {1, 0, 0, 1, 1, -2});
  // g_proj zero: every gate 0.5; MLP zero.

  const double eps = c.norm_eps;
  const std::vector<Vec> e = {{1, 1}, {1, -1}, {2, 0.5}};
  std::vector<Vec> n;
  for (const Vec& x : e) n.push_back(Rms(x, eps));
  auto phi_v = [](const Vec& r0, const Vec& r1) {
    const double a = r0[0] + 0.1, b = r0[1] + 0.2, cc = r1[0] + 0.3, dd = r1[1] + 0.4;
    const double h0 = Silu(a + dd), h1 = Silu(b - cc);
    return Vec{h0, 0.5 * h0 + h1};
  };
  const Vec ck = {Silu(0.5 - 0.2), 2 * Silu(0.1 - 0.3)};
  const Vec phi01 = phi_v(n[0], n[1]), phi12 = phi_v(n[1], n[2]);
  // t=2: two compressed tokens, keys Rot(ck, 0) and Rot(ck, 1); query Rot(n2, 2).
  const Vec q2 = Rot(n[2], 2);
  const double s0 = Dot(q2, Rot(ck, 0)) / std::sqrt(2.0), s1 = Dot(q2, Rot(ck, 1)) / std::sqrt(2.0);
  const double p0 = 1 / (1 + std::exp(s1 - s0)), p1 = 1 - p0;
  // Selection keys are zero (uniform): t=0 {0}, t=1 {0, 1}, t=2 the current block 1 = {2}.
  const std::vector<Vec> o = {
      Mul(0.5, Mul(2, n[0])),
      Add(Mul(0.5, phi01), Mul(0.5, Mul(0.5, Add(Mul(2, n[0]), Mul(2, n[1]))))),
      Add(Mul(0.5, Add(Mul(p0, phi01), Mul(p1, phi12))), Mul(0.5, Mul(2, n[2]))),
  };
  std::vector<Vec> want;
  for (int t = 0; t < 3; ++t) {
    const Vec f = Rms(Add(e[t], o[t]), eps);
    want.push_back({f[0], f[1], f[0] - 2 * f[1]});
  }
  ExpectLogits(NaiveForward(w, {0, 1, 2}), want, 1e-6, 1e-5);
}

// Dense llama, d_k = 4, theta 100 (inv_freq 1 and 0.1, pairs (0, 2) and (1, 3)), identity q/k/v/o.
TEST(NaiveForwardByHand, LlamaRopeTwoPositions) {
  ModelConfig c = TinyConfig(Architecture::kLlama, 4, 1, 1, 4, 4, 4);
  c.rope_theta = 100.0;
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  ModelWeights w = ZeroModel(c);
  auto& L = w.layers[0];
  const std::vector<float> eye = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
  Set(w.embed, {1, 0, 0, 1, 0.5f, 1, -1, 0.3f, 0, 0, 0, 0, 0, 0, 0, 0});
  Set(L.q_proj, eye);
  Set(L.k_proj, eye);
  Set(L.v_proj, eye);
  Set(L.o_proj, eye);
  Set(w.lm_head, eye);
  const double eps = c.norm_eps;
  const Vec e0 = {1, 0, 0, 1}, e1 = {0.5, 1, -1, 0.3};
  const Vec n0 = Rms(e0, eps), n1 = Rms(e1, eps);
  auto rope = [](const Vec& x, double pos) {
    const Vec a = Rot({x[0], x[2]}, pos * 1.0), b = Rot({x[1], x[3]}, pos * 0.1);
    return Vec{a[0], b[0], a[1], b[1]};
  };
  auto dot4 = [](const Vec& a, const Vec& b) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2] + a[3] * b[3]; };
  const Vec q1 = rope(n1, 1), k0 = n0, k1 = rope(n1, 1);
  const double s0 = dot4(q1, k0) / 2, s1 = dot4(q1, k1) / 2;  // scale 1/sqrt(4)
  const double p0 = 1 / (1 + std::exp(s1 - s0)), p1 = 1 - p0;
  std::vector<Vec> h = {{}, {}};
  for (int i = 0; i < 4; ++i) {
    h[0].push_back(e0[i] + n0[i]);
    h[1].push_back(e1[i] + p0 * n0[i] + p1 * n1[i]);
  }
  ExpectLogits(NaiveForward(w, {0, 1}), {Rms(h[0], eps), Rms(h[1], eps)}, 1e-6, 1e-5);
}

// GQA: 4 query heads on 2 KV heads; head h must read KV head h / 2. Zero queries, so each head outputs
// the mean value of its KV head; KV head 0 holds n, KV head 1 holds 2n.
TEST(NaiveForwardByHand, QueryHeadsShareKvHeadsInOrder) {
  ModelConfig c = TinyConfig(Architecture::kLlama, 2, 4, 2, 2, 2, 2);
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  ModelWeights w = ZeroModel(c);
  auto& L = w.layers[0];
  Set(w.embed, {1, 1, 1, -1});
  Set(L.v_proj, {1, 0, 0, 1, 2, 0, 0, 2});
  // hidden[0] += head 1's output[0]; hidden[1] += head 2's output[1].
  std::vector<float> o(2 * 8, 0.0f);
  o[0 * 8 + 1 * 2 + 0] = 1;
  o[1 * 8 + 2 * 2 + 1] = 1;
  Set(L.o_proj, o);
  Set(w.lm_head, {1, 0, 0, 1});
  const double eps = c.norm_eps;
  const Vec n0 = Rms({1, 1}, eps), n1 = Rms({1, -1}, eps);
  const Vec m = Mul(0.5, Add(n0, n1));
  const Vec h0 = {1 + n0[0], 1 + 2 * n0[1]}, h1 = {1 + m[0], -1 + 2 * m[1]};
  ExpectLogits(NaiveForward(w, {0, 1}), {Rms(h0, eps), Rms(h1, eps)}, 1e-6, 1e-5);
}

// ---------------------------------------------------------------------------------------------------
// Whole models, random weights: causality and a long sequence

ModelConfig RandomConfig(Architecture arch) {
  ModelConfig c = TinyConfig(arch, 32, 4, 2, 8, 8, 50);
  c.num_layers = 2;
  c.intermediate_size = 48;
  switch (arch) {
    case Architecture::kNsa:
      c.nsa = Geometry(8, 8, 8, 4, 1, 2, 16);
      c.nsa.compression = Compression::kMeanPostRope;
      c.nsa.shared_kv = true;
      c.nsa.cmp_mlp_hidden = 0;
      c.qkv_bias = true;
      c.tie_word_embeddings = true;
      break;
    case Architecture::kLlamaNsa:
      c.nsa = Geometry(8, 8, 8, 3, 0, 1, 12);
      c.nsa.compression = Compression::kMeanPostRope;
      c.nsa.shared_kv = true;
      c.nsa.cmp_mlp_hidden = 0;
      break;
    case Architecture::kNsaPaper:
      c.head_dim_v = 6;
      c.nsa = Geometry(8, 4, 16, 3, 1, 1, 20);
      c.nsa.cmp_mlp_hidden = 16;
      break;
    case Architecture::kLlama: break;
  }
  return c;
}

TEST(NaiveForwardRandom, PrefixLogitsDoNotDependOnLaterTokens) {
  for (Architecture arch : {Architecture::kNsa, Architecture::kLlamaNsa, Architecture::kNsaPaper,
                            Architecture::kLlama}) {
    SCOPED_TRACE(std::string(engine::ArchitectureName(arch)));
    const ModelConfig c = RandomConfig(arch);
    ASSERT_TRUE(c.Validate().ok()) << c.Validate();
    const ModelWeights w = RandomModel(c, 7, 0.5f);
    std::mt19937 rng(11);
    std::vector<int32_t> tokens(150);
    for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % c.vocab_size);
    const auto full = NaiveForward(w, tokens);
    const auto prefix = NaiveForward(w, std::vector<int32_t>(tokens.begin(), tokens.begin() + 97));
    ASSERT_EQ(full.size(), 150u);
    ASSERT_EQ(prefix.size(), 97u);
    for (size_t t = 0; t < prefix.size(); ++t) {
      ASSERT_EQ(prefix[t].size(), static_cast<size_t>(c.vocab_size));
      for (int v = 0; v < c.vocab_size; ++v) {
        ASSERT_FALSE(std::isnan(full[t][v])) << "seed 7, position " << t << " index " << v;
        ASSERT_NEAR(prefix[t][v], full[t][v], 1e-6 + 1e-6 * std::fabs(full[t][v]))
            << "seed 7, position " << t << " index " << v;
      }
    }
  }
}

// Sparse selection changes the output once there are more blocks than n (the branches are not all
// the same dense attention in disguise): a model with n covering every block differs from one without.
TEST(NaiveForwardRandom, SelectionMattersBeyondNBlocks) {
  ModelConfig c = RandomConfig(Architecture::kNsaPaper);
  ModelConfig all = c;
  all.nsa.num_selected = 64;
  const ModelWeights w = RandomModel(c, 3, 0.5f);
  ModelWeights w_all = w;
  w_all.config = all;
  std::vector<int32_t> tokens(80);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 7 + 3) % c.vocab_size);
  const auto a = NaiveForward(w, tokens), b = NaiveForward(w_all, tokens);
  // Up to 3 blocks (t < 48) both select everything: identical.
  for (int t = 0; t < 48; ++t) {
    for (int v = 0; v < c.vocab_size; ++v) ASSERT_EQ(a[t][v], b[t][v]) << "position " << t;
  }
  double diff = 0;
  for (int v = 0; v < c.vocab_size; ++v) diff = std::max(diff, std::fabs(double(a[79][v]) - b[79][v]));
  EXPECT_GT(diff, 1e-6);
}

TEST(NaiveForwardRandom, ThreeThousandTokensOnATinyPaperModel) {
  ModelConfig c = TinyConfig(Architecture::kNsaPaper, 64, 4, 2, 16, 16, 100);
  c.num_layers = 2;
  c.intermediate_size = 128;
  c.nsa = Geometry(32, 16, 64, 16, 1, 2, 512);
  c.nsa.cmp_mlp_hidden = 32;
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  const ModelWeights w = RandomModel(c, 5, 0.2f);
  std::vector<int32_t> tokens(3000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 31 + 7) % c.vocab_size);
  const auto start = std::chrono::steady_clock::now();
  const auto logits = NaiveForward(w, tokens);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  RecordProperty("seconds", std::to_string(seconds));
  ASSERT_EQ(logits.size(), tokens.size());
  for (size_t t = 0; t < logits.size(); ++t) {
    for (float x : logits[t]) ASSERT_TRUE(std::isfinite(x)) << "seed 5, position " << t;
  }
}

}  // namespace
}  // namespace needle::testing
