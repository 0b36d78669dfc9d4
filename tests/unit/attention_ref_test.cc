// Hand-computed cases for kernels/reference: paged row addressing, the softmax over several ranges,
// the compressed-to-selection score mapping, forced blocks, top-n ties, window bounds and the empty
// compression branch.
#include "kernels/reference/attention_ref.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace needle::kernels::reference {
namespace {

NsaGeometry Paper() { return NsaGeometry{32, 16, 64, 16, 1, 2, 512}; }

TEST(KvRows, PagedRingAndTailAddressing) {
  std::vector<float> store(10 * 8, 0.0f);  // 10 pages of 4 rows of width 2
  std::vector<int32_t> table = {5, 2, 9};
  KvRows r;
  r.base = store.data();
  r.page_table = table.data();
  r.page_stride = 8;
  r.row_stride = 2;
  r.page_rows = 4;
  EXPECT_EQ(r.Row(5) - store.data(), 2 * 8 + 1 * 2);   // logical page 1 -> physical 2, row 1
  r.ring_pages = 3;
  EXPECT_EQ(r.Row(13) - store.data(), 5 * 8 + 1 * 2);  // logical page 3 wraps to 0 -> physical 5
  std::vector<float> tail(6);
  r.tail = tail.data();
  r.tail_start = 12;
  r.tail_stride = 3;
  EXPECT_EQ(r.Row(13), tail.data() + 3);
  EXPECT_EQ(r.Row(11) - store.data(), 9 * 8 + 3 * 2);
}

TEST(AttendRanges, OneSoftmaxAcrossRanges) {
  // q = [1, 0]; keys with q.k = 0, ln 3 at rows 0 and 4; rows 1..3 excluded by the ranges.
  std::vector<float> k = {0, 0, 99, 0, 99, 0, 99, 0, std::log(3.0f), 0};
  std::vector<float> v = {1, 0, 7, 7, 7, 7, 7, 7, 0, 1};
  const float q[2] = {1, 0};
  RowRange ranges[2] = {{0, 1}, {4, 5}};
  float out[2];
  double lse;
  AttendRanges(q, 1, 2, 2, KvRows::Contiguous(k.data(), 2), KvRows::Contiguous(v.data(), 2), ranges, 2, 1.0f, out,
               &lse);
  EXPECT_NEAR(out[0], 0.25, 1e-6);
  EXPECT_NEAR(out[1], 0.75, 1e-6);
  EXPECT_NEAR(lse, std::log(4.0), 1e-6);
}

TEST(AttendRanges, NoKeysGivesZeroAndMinusInfinity) {
  const float q[4] = {1, 2, 3, 4};
  float out[4] = {5, 5, 5, 5};
  double lse[2];
  AttendRanges(q, 2, 2, 2, KvRows::Contiguous(nullptr, 2), KvRows::Contiguous(nullptr, 2), nullptr, 0, 1.0f, out,
               lse);
  for (float o : out) EXPECT_EQ(o, 0.0f);
  EXPECT_TRUE(std::isinf(lse[0]) && lse[0] < 0);
}

// Compressed keys [n][1] with q = [1]: q.k_i = big at `hot`, 0 elsewhere, so p is one-hot at `hot`.
std::vector<double> OneHotScores(int64_t t, int64_t hot, const NsaGeometry& g, int G = 1) {
  const int64_t n = g.NumCompressed(t);
  std::vector<float> kc(n, 0.0f);
  kc[hot] = 200.0f;
  std::vector<float> q(G, 1.0f);
  std::vector<double> lse(G, 200.0 + std::log1p((n - 1) * std::exp(-200.0)));
  return BlockScores(q.data(), G, 1, KvRows::Contiguous(kc.data(), 1), t, lse.data(), 1.0f, g);
}

void ExpectScores(const std::vector<double>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t j = 0; j < want.size(); ++j) EXPECT_NEAR(got[j], want[j], 1e-12) << "block " << j;
}

TEST(BlockScores, OverlapWeightsOneTwoTwoTwoOne) {
  const NsaGeometry g = Paper();
  const int64_t t = 255;  // N_c = 15, blocks 0..3
  ASSERT_EQ(g.NumCompressed(t), 15);
  // Token 4 covers [64, 96): inside block 1, weight 32/16 = 2.
  ExpectScores(OneHotScores(t, 4, g), (std::vector<double>{0, 2, 0, 0}));
  // Token 3 covers [48, 80): 16 tokens in block 0 and 16 in block 1, weight 1 each.
  ExpectScores(OneHotScores(t, 3, g), (std::vector<double>{1, 1, 0, 0}));
  // Token 7 covers [112, 144): blocks 1 and 2.
  ExpectScores(OneHotScores(t, 7, g), (std::vector<double>{0, 1, 1, 0}));
  // Summed over G = 3 heads.
  ExpectScores(OneHotScores(t, 4, g, 3), (std::vector<double>{0, 6, 0, 0}));

  // Uniform p = 1/15: block j collects the weights 1,2,2,2,1 of tokens 4j-1 .. 4j+3 that exist.
  std::vector<float> kc(15, 0.0f);
  const float q = 1.0f;
  const double lse = std::log(15.0);
  std::vector<double> s = BlockScores(&q, 1, 1, KvRows::Contiguous(kc.data(), 1), t, &lse, 1.0f, g);
  ASSERT_EQ(s.size(), 4u);
  EXPECT_NEAR(s[0], 7.0 / 15, 1e-12);  // tokens 0,1,2 (2 each) + 3 (1)
  EXPECT_NEAR(s[1], 8.0 / 15, 1e-12);  // 3 (1) + 4,5,6 (2) + 7 (1)
  EXPECT_NEAR(s[2], 8.0 / 15, 1e-12);
  EXPECT_NEAR(s[3], 7.0 / 15, 1e-12);  // 11 (1) + 12,13,14 (2)
}

TEST(BlockScores, IdentityWhenBlocksCoincide) {
  const NsaGeometry g{16, 16, 16, 4, 1, 2, 32};
  const int64_t t = 100;  // N_c = 6, blocks 0..6
  ExpectScores(OneHotScores(t, 5, g), (std::vector<double>{0, 0, 0, 0, 0, 1, 0}));
  ExpectScores(OneHotScores(t, 0, g), (std::vector<double>{1, 0, 0, 0, 0, 0, 0}));
}

TEST(SelectBlocks, ForcedBlocksCountTowardN) {
  NsaGeometry g{16, 16, 16, 4, 1, 2, 32};
  const int64_t t = 7 * 16 + 3;  // current block 7; 8 blocks
  std::vector<double> s = {0.0, 0.5, 0.9, 0.9, 0.1, 0.2, 0.0, 0.0};
  // Forced 0, 7, 6; one slot left: blocks 2 and 3 tie at 0.9 -> the lower index wins.
  EXPECT_EQ(SelectBlocks(s, t, g), (std::vector<int64_t>{0, 2, 6, 7}));
  // Forced blocks win even with the lowest scores.
  s = {0.0, 5, 4, 3, 2, 1, 0.0, 0.0};
  EXPECT_EQ(SelectBlocks(s, t, g), (std::vector<int64_t>{0, 1, 6, 7}));
  // llama-nsa: only the current block is forced.
  g.forced_initial = 0;
  g.forced_local = 1;
  EXPECT_EQ(SelectBlocks(s, t, g), (std::vector<int64_t>{1, 2, 3, 7}));
}

TEST(SelectBlocks, FewerBlocksThanNSelectsAll) {
  NsaGeometry g{16, 16, 16, 4, 1, 2, 32};
  EXPECT_EQ(SelectBlocks({0.1, 0.2, 0.3}, 40, g), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(SelectBlocks({1.0}, 0, g), (std::vector<int64_t>{0}));
  // Exactly n blocks.
  EXPECT_EQ(SelectBlocks({0, 0, 0, 0}, 63, g), (std::vector<int64_t>{0, 1, 2, 3}));
}

TEST(SelectedRanges, MaskedToPositionsUpToT) {
  auto r = SelectedRanges({0, 2, 3}, 3 * 16 + 4, 16);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].begin, 0);
  EXPECT_EQ(r[0].end, 16);
  EXPECT_EQ(r[1].begin, 32);
  EXPECT_EQ(r[1].end, 48);
  EXPECT_EQ(r[2].begin, 48);
  EXPECT_EQ(r[2].end, 53);  // positions 48..52, t = 52
}

TEST(WindowRange, Boundaries) {
  EXPECT_EQ(WindowRange(10, 4).begin, 7);   // keys 7, 8, 9, 10: w keys including the query
  EXPECT_EQ(WindowRange(10, 4).end, 11);
  EXPECT_EQ(WindowRange(2, 4).begin, 0);    // t < w - 1: from 0
  EXPECT_EQ(WindowRange(3, 4).begin, 0);    // t = w - 1: exactly w keys
  EXPECT_EQ(WindowRange(4, 4).begin, 1);
}

TEST(NsaAttention, EmptyCompressionBranchIsZero) {
  // l = 32: at t = 30 no compressed token is complete. Gate only the cmp branch: output must be 0.
  const NsaGeometry g = Paper();
  std::vector<float> raw(31 * 2, 1.0f);
  NsaBranchRows rows;
  rows.kc = rows.vc = KvRows::Contiguous(nullptr, 2);
  rows.ks = rows.vs = rows.kw = rows.vw = KvRows::Contiguous(raw.data(), 2);
  const float q[2] = {0.3f, -0.2f};
  const float gates[3] = {1.0f, 0.0f, 0.0f};
  float out[2] = {9, 9};
  NsaAttention(q, gates, 1, 2, 2, rows, 30, 1.0f, g, out);
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(out[1], 0.0f);
  // The slc branch alone over constant values returns that constant.
  const float gates_slc[3] = {0.0f, 1.0f, 0.0f};
  NsaAttention(q, gates_slc, 1, 2, 2, rows, 30, 1.0f, g, out);
  EXPECT_NEAR(out[0], 1.0f, 1e-6);
}

}  // namespace
}  // namespace needle::kernels::reference

namespace needle::kernels::reference {
namespace {

TEST(SelectBlocks, ChunkedMergeKeepsOnlyHalfAChunkFromThePast) {
  // C = 4 blocks per chunk, n = 4 > C/2: fla-org's merge keeps the best 2 of chunks before the current
  // block's chunk and the best 2 of that chunk. Current block 9 (chunk 2 = blocks 8..11, 10 blocks).
  NsaGeometry g{16, 16, 16, 4, 0, 1, 32, 4};
  const int64_t t = 9 * 16 + 5;
  //                        0    1    2    3    4    5    6    7    8    9
  std::vector<double> s = {0.9, 0.8, 0.7, 0.1, 0.6, 0.1, 0.1, 0.1, 0.2, 0.0};
  // Past best 2: blocks 0, 1. Current chunk best 2: block 9 (forced), then 8. Exact top-4 would be
  // {0, 1, 2, 9}; the merge gives {0, 1, 8, 9}.
  EXPECT_EQ(SelectBlocks(s, t, g), (std::vector<int64_t>{0, 1, 8, 9}));
  g.topk_merge_chunk = 0;
  EXPECT_EQ(SelectBlocks(s, t, g), (std::vector<int64_t>{0, 1, 2, 9}));
  // n <= C/2: the merge is exact.
  g.topk_merge_chunk = 8;
  EXPECT_EQ(SelectBlocks(s, t, g), (std::vector<int64_t>{0, 1, 2, 9}));
  // Within the first chunk (current < C) it is exact too.
  g.topk_merge_chunk = 16;
  EXPECT_EQ(SelectBlocks(s, t, g), (std::vector<int64_t>{0, 1, 2, 9}));
}

}  // namespace
}  // namespace needle::kernels::reference
