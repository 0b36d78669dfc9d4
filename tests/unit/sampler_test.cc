// Sampler: the PRNG against published / independently computed values, greedy ties, penalties by
// hand-computed amounts, the candidate sets and frequencies of each filter on a hand-built
// distribution, the draw order, reproducibility, raw-logit logprobs, and a large vocabulary against a
// deliberately naive full-sort reference.
#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <vector>

namespace needle::engine {
namespace {

constexpr int kDraws = 20000;

// Logits of a hand-built distribution over 4 ids: p = {0.3, 0.1, 0.4, 0.2}. Descending order is
// 2 (0.4), 0 (0.3), 3 (0.2), 1 (0.1), so id order and probability order differ.
std::vector<float> FourTokenLogits() {
  return {std::log(0.3f), std::log(0.1f), std::log(0.4f), std::log(0.2f)};
}

// Draws kDraws tokens with a fixed seed and checks that only the ids in `expected` appear, each with
// a frequency within 3 sigma of its expected probability.
void ExpectFrequencies(const SamplingParams& params, const std::vector<float>& logits,
                       const std::map<int32_t, double>& expected, uint64_t seed = 1234) {
  Sampler sampler(params, seed, {});
  std::map<int32_t, int> counts;
  for (int i = 0; i < kDraws; ++i) {
    ++counts[sampler.Sample(logits.data(), static_cast<int>(logits.size()), nullptr, 0)];
  }
  for (const auto& [id, n] : counts) {
    EXPECT_TRUE(expected.count(id)) << "id " << id << " drawn " << n << " times (seed " << seed
                                    << ") but is not a candidate";
  }
  for (const auto& [id, p] : expected) {
    const double freq = static_cast<double>(counts[id]) / kDraws;
    const double sigma = std::sqrt(p * (1 - p) / kDraws);
    EXPECT_NEAR(freq, p, 3 * sigma + 1e-12) << "id " << id << " seed " << seed;
  }
}

TEST(Xoshiro256, MatchesTheReferenceStream) {
  // splitmix64 from 0 gives e220a8397b1dcdaf 6e789e6aa1b965f4 06c45d188009454f f88bb8a8724c81ec
  // (published); these outputs come from a transcription of the reference xoshiro256** C code into
  // Python, independent of engine/sampler.cc.
  Xoshiro256 rng(0);
  EXPECT_EQ(rng.Next(), 0x99ec5f36cb75f2b4ull);
  EXPECT_EQ(rng.Next(), 0xbf6e1f784956452aull);
  EXPECT_EQ(rng.Next(), 0x1a5f849d4933e6e0ull);
  Xoshiro256 rng42(42);
  EXPECT_EQ(rng42.Next(), 0x15780b2e0c2ec716ull);
  // NextDouble is the top 53 bits times 2^-53.
  Xoshiro256 d(0);
  EXPECT_EQ(d.NextDouble(), static_cast<double>(0x99ec5f36cb75f2b4ull >> 11) / 9007199254740992.0);
}

TEST(Sampler, GreedyPicksTheArgmaxWithTiesToTheLowestId) {
  SamplingParams p;
  p.temperature = 0;
  Sampler s(p, 0, {});
  std::vector<float> logits = {1, 3, 3, 2};
  EXPECT_EQ(s.Sample(logits.data(), 4, nullptr, 0), 1);
  logits = {-5, -1, -2, -1};
  EXPECT_EQ(s.Sample(logits.data(), 4, nullptr, 0), 1);
  logits = {std::numeric_limits<float>::quiet_NaN(), -7, -7};
  EXPECT_EQ(s.Sample(logits.data(), 3, nullptr, 0), 1);
  logits = {0, 0, 0, 0};
  EXPECT_EQ(s.Sample(logits.data(), 4, nullptr, 0), 0);
}

TEST(Sampler, PenaltiesChangeLogitsByTheHandComputedAmounts) {
  SamplingParams p;
  p.repetition_penalty = 2;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  Sampler s(p, 0, /*prompt=*/{1, 1, 3});
  s.Accept(3);
  s.Accept(4);
  s.Accept(4);
  s.Accept(10);  // outside this vocabulary: ignored
  std::vector<float> logits = {1.0f, 2.0f, -1.0f, 4.0f, -2.0f, 3.0f};
  s.ApplyPenalties(logits.data(), 6);
  EXPECT_EQ(logits[0], 1.0f);          // never seen
  EXPECT_EQ(logits[1], 1.0f);          // prompt only: 2 / 2, no presence/frequency
  EXPECT_EQ(logits[2], -1.0f);         // never seen
  EXPECT_EQ(logits[3], 1.25f);         // 4 / 2 - 0.5 - 0.25 * 1
  EXPECT_EQ(logits[4], -5.0f);         // -2 * 2 - 0.5 - 0.25 * 2
  EXPECT_EQ(logits[5], 3.0f);          // never seen
}

TEST(Sampler, NegativePenaltiesRewardAndRepetitionBelowOneBoosts) {
  SamplingParams p;
  p.repetition_penalty = 0.5f;
  p.presence_penalty = -1.0f;
  p.frequency_penalty = -2.0f;
  Sampler s(p, 0, {0});
  s.Accept(1);
  std::vector<float> logits = {3.0f, -3.0f, 0.0f};
  s.ApplyPenalties(logits.data(), 3);
  EXPECT_EQ(logits[0], 6.0f);   // 3 / 0.5
  EXPECT_EQ(logits[1], 1.5f);   // -3 * 0.5 + 1 + 2
  EXPECT_EQ(logits[2], 0.0f);
}

TEST(Sampler, PenaltiesSteerGreedy) {
  SamplingParams p;
  p.temperature = 0;
  p.repetition_penalty = 2;
  Sampler s(p, 0, /*prompt=*/{0});
  std::vector<float> logits = {2.0f, 1.5f};
  EXPECT_EQ(s.Sample(logits.data(), 2, nullptr, 0), 1);  // 2 / 2 = 1 < 1.5
  SamplingParams f;
  f.temperature = 0;
  f.frequency_penalty = 1;
  Sampler g(f, 0, {});
  logits = {2.0f, 0.5f};
  EXPECT_EQ(g.Sample(logits.data(), 2, nullptr, 0), 0);
  g.Accept(0);
  EXPECT_EQ(g.Sample(logits.data(), 2, nullptr, 0), 0);  // 2 - 1 = 1 > 0.5
  g.Accept(0);
  EXPECT_EQ(g.Sample(logits.data(), 2, nullptr, 0), 1);  // 2 - 2 = 0 < 0.5
}

TEST(Sampler, UnfilteredFrequenciesMatchTheDistribution) {
  ExpectFrequencies(SamplingParams{}, FourTokenLogits(), {{0, 0.3}, {1, 0.1}, {2, 0.4}, {3, 0.2}});
}

TEST(Sampler, TemperatureSharpens) {
  SamplingParams p;
  p.temperature = 0.5f;  // p^2 renormalised: {0.09, 0.01, 0.16, 0.04} / 0.30
  ExpectFrequencies(p, FourTokenLogits(),
                    {{0, 0.09 / 0.30}, {1, 0.01 / 0.30}, {2, 0.16 / 0.30}, {3, 0.04 / 0.30}});
}

TEST(Sampler, TopKKeepsTheKMostProbable) {
  SamplingParams p;
  p.top_k = 2;  // {2: 0.4, 0: 0.3} -> 4/7, 3/7
  ExpectFrequencies(p, FourTokenLogits(), {{2, 4.0 / 7}, {0, 3.0 / 7}});
  p.top_k = 1;
  ExpectFrequencies(p, FourTokenLogits(), {{2, 1.0}});
  p.top_k = 10;  // more than the vocabulary: no limit
  ExpectFrequencies(p, FourTokenLogits(), {{0, 0.3}, {1, 0.1}, {2, 0.4}, {3, 0.2}});
}

TEST(Sampler, TopKTiesGoToTheLowerId) {
  SamplingParams p;
  p.top_k = 2;
  const std::vector<float> logits = {0.0f, 1.0f, 0.0f, 0.0f};  // ids 0, 2, 3 tie
  ExpectFrequencies(p, logits, {{1, std::exp(1.0) / (std::exp(1.0) + 1)},
                                {0, 1 / (std::exp(1.0) + 1)}});
}

TEST(Sampler, TopPKeepsTheSmallestPrefixReachingTheMass) {
  SamplingParams p;
  p.top_p = 0.75f;  // 0.4 + 0.3 = 0.7 < 0.75, + 0.2 = 0.9: {2, 0, 3} -> 4/9, 3/9, 2/9
  ExpectFrequencies(p, FourTokenLogits(), {{2, 4.0 / 9}, {0, 3.0 / 9}, {3, 2.0 / 9}});
  p.top_p = 0.35f;  // 0.4 >= 0.35 alone
  ExpectFrequencies(p, FourTokenLogits(), {{2, 1.0}});
  p.top_p = 0.65f;  // 0.4 < 0.65 <= 0.7
  ExpectFrequencies(p, FourTokenLogits(), {{2, 4.0 / 7}, {0, 3.0 / 7}});
}

TEST(Sampler, TopPAppliesToTheTopKRenormalisedDistribution) {
  SamplingParams p;
  p.top_k = 2;     // {2: 4/7 = 0.571, 0: 3/7}
  p.top_p = 0.55f; // 0.571 >= 0.55: only id 2 (on the raw masses, 0.4 < 0.55 would keep id 0 too)
  ExpectFrequencies(p, FourTokenLogits(), {{2, 1.0}});
}

TEST(Sampler, MinPDropsTokensBelowAFractionOfTheMax) {
  SamplingParams p;
  p.min_p = 0.6f;  // threshold 0.24: {2: 0.4, 0: 0.3}
  ExpectFrequencies(p, FourTokenLogits(), {{2, 4.0 / 7}, {0, 3.0 / 7}});
  p.min_p = 0.4f;  // threshold 0.16: {2, 0, 3}
  ExpectFrequencies(p, FourTokenLogits(), {{2, 4.0 / 9}, {0, 3.0 / 9}, {3, 2.0 / 9}});
  p.min_p = 1.0f;  // only the max
  ExpectFrequencies(p, FourTokenLogits(), {{2, 1.0}});
}

TEST(Sampler, MinPAfterTopP) {
  SamplingParams p;
  p.top_p = 0.75f;  // {2, 0, 3}
  p.min_p = 0.6f;   // threshold 0.24 removes 3
  ExpectFrequencies(p, FourTokenLogits(), {{2, 4.0 / 7}, {0, 3.0 / 7}});
}

TEST(Sampler, MaskedLogitsAreNeverDrawn) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const std::vector<float> logits = {ninf, 0.0f, ninf, 0.0f};
  ExpectFrequencies(SamplingParams{}, logits, {{1, 0.5}, {3, 0.5}});
}

TEST(Sampler, DrawWalksCandidatesInDescendingProbability) {
  // Seed 0's first three uniforms are 0.60126, 0.74777, 0.10302 (see the Xoshiro256 test). In
  // descending order the cumulative masses are 0.4 (id 2), 0.7 (id 0), 0.9 (id 3), 1.0 (id 1);
  // walking by id instead (0.3, 0.4, 0.8, 1.0) would give 2, 2, 0.
  Sampler s(SamplingParams{}, 0, {});
  const std::vector<float> logits = FourTokenLogits();
  EXPECT_EQ(s.Sample(logits.data(), 4, nullptr, 0), 0);
  EXPECT_EQ(s.Sample(logits.data(), 4, nullptr, 0), 3);
  EXPECT_EQ(s.Sample(logits.data(), 4, nullptr, 0), 2);
}

TEST(Sampler, SameSeedSameSequence) {
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = 0.1f * static_cast<float>(i % 7);
  SamplingParams p;
  p.top_p = 0.9f;
  p.presence_penalty = 0.3f;
  auto run = [&](uint64_t seed) {
    Sampler s(p, seed, {1, 2, 3});
    std::vector<int32_t> out;
    for (int i = 0; i < 200; ++i) {
      out.push_back(s.Sample(logits.data(), 50, nullptr, 0));
      s.Accept(out.back());
    }
    return out;
  };
  EXPECT_EQ(run(77), run(77));
  EXPECT_NE(run(77), run(78));
}

TEST(Sampler, LogprobsAreTheLogSoftmaxOfTheRawLogits) {
  // Raw logits ln{1, 4, 2, 1}: p = {1/8, 1/2, 1/4, 1/8}.
  const std::vector<float> logits = {0.0f, std::log(4.0f), std::log(2.0f), 0.0f};
  const double ln2 = 0.69314718055994531, ln4 = 1.3862943611198906, ln8 = 2.0794415416798357;
  // Greedy with a repetition penalty on id 1 and a temperature would change the sampling
  // distribution, but not the reported logprobs.
  SamplingParams p;
  p.temperature = 0;
  p.repetition_penalty = 10;
  Sampler s(p, 0, /*prompt=*/{1});
  TokenLogprob lp;
  const int32_t id = s.Sample(logits.data(), 4, &lp, 4);
  EXPECT_EQ(id, 2);  // penalised: {0, 0.1386, 0.6931, 0}
  EXPECT_EQ(lp.id, 2);
  EXPECT_NEAR(lp.logprob, -ln4, 1e-6);
  ASSERT_EQ(lp.top.size(), 4u);
  const std::vector<int32_t> order = {1, 2, 0, 3};  // ids 0 and 3 tie: lower id first
  const std::vector<double> expected = {-ln2, -ln4, -ln8, -ln8};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(lp.top[i].first, order[i]) << "rank " << i;
    EXPECT_NEAR(lp.top[i].second, expected[i], 1e-6) << "rank " << i;
  }

  SamplingParams hot;
  hot.temperature = 3;
  Sampler t(hot, 5, {});
  TokenLogprob lp2;
  const int32_t drawn = t.Sample(logits.data(), 4, &lp2, 2);
  const double want[] = {-ln8, -ln2, -ln4, -ln8};
  EXPECT_EQ(lp2.id, drawn);
  EXPECT_NEAR(lp2.logprob, want[drawn], 1e-6);
  ASSERT_EQ(lp2.top.size(), 2u);
  EXPECT_EQ(lp2.top[0].first, 1);
  EXPECT_EQ(lp2.top[1].first, 2);

  TokenLogprob none;
  t.Sample(logits.data(), 4, &none, 0);
  EXPECT_TRUE(none.top.empty());
}

// A deliberately naive sampler over the spec: full sort, filters in order, inverse CDF with u from
// the same PRNG stream.
int32_t NaiveSample(const std::vector<float>& logits, const SamplingParams& sp, double u) {
  const int v = static_cast<int>(logits.size());
  const double m = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(v);
  for (int i = 0; i < v; ++i) p[i] = std::exp((logits[i] - m) / sp.temperature);
  std::vector<int32_t> ids(v);
  std::iota(ids.begin(), ids.end(), 0);
  std::sort(ids.begin(), ids.end(),
            [&](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  size_t n = ids.size();
  if (sp.top_k > 0) n = std::min<size_t>(n, sp.top_k);
  if (sp.top_p < 1) {
    double total = 0;
    for (size_t i = 0; i < n; ++i) total += p[ids[i]];
    double cum = 0;
    for (size_t i = 0; i < n; ++i) {
      cum += p[ids[i]];
      if (cum >= sp.top_p * total) {
        n = i + 1;
        break;
      }
    }
  }
  if (sp.min_p > 0) {
    size_t keep = 0;
    while (keep < n && p[ids[keep]] >= sp.min_p * p[ids[0]]) ++keep;
    n = keep;
  }
  double mass = 0;
  for (size_t i = 0; i < n; ++i) mass += p[ids[i]];
  double cum = 0;
  for (size_t i = 0; i < n; ++i) {
    cum += p[ids[i]];
    if (cum > u * mass) return ids[i];
  }
  return ids[n - 1];
}

TEST(Sampler, LargeVocabularyMatchesANaiveFullSort) {
  // Flat-ish logits so the draw walks thousands of candidates, through several sort chunks.
  const int vocab = 1 << 18;
  std::vector<float> logits(vocab);
  uint64_t x = 12345;
  for (int i = 0; i < vocab; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    logits[i] = static_cast<float>((x >> 40) % 1000) / 250.0f;  // 0..3.996 in steps of 0.004
  }
  struct Case {
    float temperature, top_p, min_p;
    int top_k;
  };
  for (const Case& c : {Case{1.0f, 1.0f, 0.0f, 0}, Case{2.0f, 0.9f, 0.0f, 0},
                        Case{1.0f, 1.0f, 0.3f, 0}, Case{1.0f, 0.5f, 0.0f, 5000},
                        Case{0.7f, 0.95f, 0.2f, 100000}}) {
    SamplingParams sp;
    sp.temperature = c.temperature;
    sp.top_p = c.top_p;
    sp.min_p = c.min_p;
    sp.top_k = c.top_k;
    const uint64_t seed = 99;
    Sampler s(sp, seed, {});
    Xoshiro256 rng(seed);
    for (int step = 0; step < 4; ++step) {
      const double u = rng.NextDouble();
      EXPECT_EQ(s.Sample(logits.data(), vocab, nullptr, 0), NaiveSample(logits, sp, u))
          << "T " << c.temperature << " top_p " << c.top_p << " min_p " << c.min_p << " top_k "
          << c.top_k << " step " << step;
    }
  }
}

}  // namespace
}  // namespace needle::engine
