// The sampling reference (kernels/reference/sampling_ref.h), which the GPU sampling test trusts,
// against engine::Sampler: with u taken from the same xoshiro256** stream the sampler draws from,
// both must pick the same token at every step, penalties and filters included, and agree on logprobs.
#include "kernels/reference/sampling_ref.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "engine/sampler.h"

namespace needle::kernels::reference {
namespace {

struct Combo {
  float temperature, top_p, min_p, repetition, presence, frequency;
  int top_k;
};

std::vector<Combo> Combos() {
  return {
      {1.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0},   {0.7f, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f, 0},
      {1.3f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 40},  {1.0f, 0.8f, 0.05f, 1.0f, 0.0f, 0.0f, 20},
      {0.0f, 1.0f, 0.0f, 1.3f, 0.5f, 0.2f, 0},   {0.9f, 0.95f, 0.0f, 1.2f, 0.3f, 0.1f, 50},
      {1.0f, 1.0f, 0.1f, 1.0f, -0.5f, 0.4f, 0},  {2.0f, 0.5f, 0.0f, 0.8f, 0.0f, 0.0f, 5},
      {0.5f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 1},
  };
}

TEST(SamplingRef, MatchesTheEngineSamplerStepByStep) {
  constexpr int kVocab = 1000;
  constexpr int kSteps = 60;
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    for (const Combo& c : Combos()) {
      engine::SamplingParams sp;
      sp.temperature = c.temperature;
      sp.top_p = c.top_p;
      sp.top_k = c.top_k;
      sp.min_p = c.min_p;
      sp.repetition_penalty = c.repetition;
      sp.presence_penalty = c.presence;
      sp.frequency_penalty = c.frequency;
      SamplingRowRef row;
      row.temperature = c.temperature;
      row.top_p = c.top_p;
      row.top_k = c.top_k;
      row.min_p = c.min_p;
      row.repetition_penalty = c.repetition;
      row.presence_penalty = c.presence;
      row.frequency_penalty = c.frequency;

      std::mt19937_64 rng(seed * 7919);
      std::uniform_int_distribution<int> id(0, kVocab - 1);
      std::vector<int32_t> prompt;
      for (int i = 0; i < 30; ++i) prompt.push_back(id(rng));
      engine::Sampler sampler(sp, seed, prompt);
      engine::Xoshiro256 stream(seed);  // the sampler's own stream, replayed
      std::set<int32_t> seen(prompt.begin(), prompt.end());
      std::map<int32_t, int> generated;
      std::normal_distribution<float> normal(0.0f, 3.0f);
      for (int step = 0; step < kSteps; ++step) {
        std::vector<float> logits(kVocab);
        for (float& x : logits) x = normal(rng);
        std::vector<PenaltyEntryRef> history;
        for (int32_t s : seen) history.push_back({s, generated.count(s) ? generated[s] : 0});
        const double u = c.temperature == 0.0f ? 0.0 : stream.NextDouble();
        engine::TokenLogprob lp;
        const int32_t got = sampler.Sample(logits.data(), kVocab, &lp, 0);
        const int32_t want = SampleRef(row, history, logits.data(), kVocab, u);
        ASSERT_EQ(got, want) << "seed " << seed << " step " << step << " T " << c.temperature << " top_k "
                             << c.top_k << " top_p " << c.top_p << " min_p " << c.min_p;
        std::vector<float> ls(kVocab);
        LogSoftmaxRef(logits.data(), kVocab, ls.data());
        EXPECT_NEAR(lp.logprob, ls[got], 1e-6) << "seed " << seed << " step " << step;
        sampler.Accept(got);
        seen.insert(got);
        ++generated[got];
      }
    }
  }
}

TEST(SamplingRef, GreedyTiesGoToTheLowestIdAndMaskedRowsPickZero) {
  SamplingRowRef greedy;
  greedy.temperature = 0;
  const float nan = std::nanf(""), inf = INFINITY;
  std::vector<float> a = {1, 3, nan, 3, 2};
  EXPECT_EQ(SampleRef(greedy, {}, a.data(), 5, 0.5), 1);
  SamplingRowRef hot;
  std::vector<float> masked = {-inf, nan, -inf};
  EXPECT_EQ(SampleRef(hot, {}, masked.data(), 3, 0.7), 0);
  // +inf logits share all the mass equally, in id order.
  std::vector<float> infs = {0, inf, 5, inf};
  EXPECT_EQ(SampleRef(hot, {}, infs.data(), 4, 0.25), 1);
  EXPECT_EQ(SampleRef(hot, {}, infs.data(), 4, 0.75), 3);
  std::vector<float> lp(4);
  LogSoftmaxRef(infs.data(), 4, lp.data());
  EXPECT_FLOAT_EQ(lp[1], -std::log(2.0f));
  EXPECT_EQ(lp[0], -INFINITY);
}

}  // namespace
}  // namespace needle::kernels::reference
