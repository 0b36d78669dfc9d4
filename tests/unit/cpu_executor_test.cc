// CpuExecutor on whole tiny models of every architecture against the independent full recompute in
// tests/support/naive_forward (contiguous, non-incremental, double): token-by-token cached decode,
// chunked prefill of several chunk sizes and permuted physical pages all give the same logits at
// every position, and the pools return to their baseline.
#include "engine/cpu_executor.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "engine/kv_cache.h"
#include "engine/presets.h"
#include "tests/support/executor_test_util.h"
#include "tests/support/naive_forward.h"

namespace needle::engine {
namespace {

constexpr double kTol = 1e-4;

using test::PageTokens;
using test::RandomTokens;

// Runs `tokens` through a fresh cache in chunks of `chunk` tokens; returns logits [T][vocab].
std::vector<float> RunChunked(const ModelWeights& w, const std::vector<int32_t>& tokens, int64_t chunk,
                              uint64_t shuffle_seed, int page_tokens) {
  const ModelConfig& m = w.config;
  const int64_t T = static_cast<int64_t>(tokens.size());
  // Room for this sequence and a second one, so physical pages really are scattered.
  KvCacheConfig cache = SizePools(m, 1, 4, 2 * T, page_tokens);
  cache.shuffle_seed = shuffle_seed;
  KvCacheManager kv(m, cache);
  const std::vector<PoolStats> baseline = kv.Stats();
  CpuExecutor exec(w, cache);
  auto r = kv.Plan(7, T);
  EXPECT_TRUE(r.ok()) << r.status();
  kv.Commit(*r);
  std::vector<float> logits;
  for (int64_t s = 0; s < T; s += chunk) {
    const int64_t len = std::min(chunk, T - s);
    StepPlan plan;
    plan.seqs.push_back({7, s, std::vector<int32_t>(tokens.begin() + s, tokens.begin() + s + len), &kv.Pages(7), true});
    StepOutput out;
    absl::Status st = exec.Run(plan, &out);
    EXPECT_TRUE(st.ok()) << st;
    logits.insert(logits.end(), out.logits.begin(), out.logits.end());
  }
  kv.Release(7);
  const std::vector<PoolStats> after = kv.Stats();
  for (size_t p = 0; p < after.size(); ++p) EXPECT_EQ(after[p].free, baseline[p].free) << after[p].name;
  return logits;
}

// Every element within kTol; no NaN. The message names the position, the token index and the worst error.
void ExpectLogitsMatch(const std::vector<std::vector<float>>& want, const std::vector<float>& got, int vocab,
                       const std::string& what) {
  ASSERT_EQ(got.size(), want.size() * vocab) << what;
  double worst = 0;
  int64_t worst_pos = -1, worst_id = -1;
  for (size_t t = 0; t < want.size(); ++t) {
    for (int v = 0; v < vocab; ++v) {
      const double g = got[t * vocab + v], e = want[t][v];
      ASSERT_FALSE(std::isnan(g)) << what << ": NaN at position " << t << " id " << v;
      const double err = std::fabs(g - e);
      if (err > worst) worst = err, worst_pos = static_cast<int64_t>(t), worst_id = v;
    }
  }
  EXPECT_LE(worst, kTol) << what << ": worst |diff| " << worst << " at position " << worst_pos << " id " << worst_id;
}

class CpuExecutorVsRecompute : public ::testing::TestWithParam<std::string> {};

TEST_P(CpuExecutorVsRecompute, CachedDecodeChunkedPrefillAndPermutedPages) {
  const std::string preset = GetParam();
  auto w = MakePresetWeights(preset, /*seed=*/11);
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelConfig& m = w->config;
  const int64_t T = 2600;  // many compressed tokens and far more than n selection blocks
  if (m.IsNsa()) {
    ASSERT_GT(m.nsa.NumCompressed(T - 1), 4 * m.nsa.num_selected);
    ASSERT_GT(T / m.nsa.sel_block, 8 * m.nsa.num_selected);
  }
  const uint64_t token_seed = 1234;
  const std::vector<int32_t> tokens = RandomTokens(T, m.vocab_size, token_seed);
  const std::vector<std::vector<float>> want = needle::testing::NaiveForward(*w, tokens);
  ASSERT_EQ(static_cast<int64_t>(want.size()), T);
  const int page = PageTokens(m);
  const std::string tag = preset + " (token seed " + std::to_string(token_seed) + ")";
  // Token-by-token decode through the paged caches, physical pages permuted.
  ExpectLogitsMatch(want, RunChunked(*w, tokens, 1, 99, page), m.vocab_size, tag + " decode, chunk 1");
  ExpectLogitsMatch(want, RunChunked(*w, tokens, 7, 0, page), m.vocab_size, tag + " chunk 7, pages in order");
  ExpectLogitsMatch(want, RunChunked(*w, tokens, 64, 12345, page), m.vocab_size, tag + " chunk 64, shuffled pages");
  ExpectLogitsMatch(want, RunChunked(*w, tokens, T, 4, page), m.vocab_size, tag + " whole prompt in one chunk");
  // A larger page (two selection blocks per page for NSA) changes nothing either.
  ExpectLogitsMatch(want, RunChunked(*w, tokens, 33, 5, 2 * page), m.vocab_size, tag + " chunk 33, page x2");
}

INSTANTIATE_TEST_SUITE_P(AllArchitectures, CpuExecutorVsRecompute,
                         ::testing::Values("tiny-nsa", "tiny-llama-nsa", "tiny-llama-nsa-merge", "tiny-nsa-paper", "tiny-llama",
                                           "tiny-nsa-qkvbias", "tiny-llama-tied"),
                         [](const auto& info) {
                           std::string n = info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

TEST(CpuExecutor, BatchOfMixedPrefillAndDecodeEqualsSeparateRuns) {
  auto w = MakePresetWeights("tiny-nsa-paper", 3);
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelConfig& m = w->config;
  const auto a = RandomTokens(300, m.vocab_size, 1), b = RandomTokens(200, m.vocab_size, 2);
  const auto want_a = needle::testing::NaiveForward(*w, a), want_b = needle::testing::NaiveForward(*w, b);
  const int page = PageTokens(m);
  KvCacheConfig cache = SizePools(m, 1 << 24, 4, 300, page);
  cache.shuffle_seed = 77;
  KvCacheManager kv(m, cache);
  CpuExecutor exec(w.value(), cache);
  for (SeqId s : {1, 2}) {
    auto r = kv.Plan(s, 300);
    ASSERT_TRUE(r.ok());
    kv.Commit(*r);
  }
  // Step 1: a's prompt (first 299 tokens) alone. Then steps where a decodes while b prefills in chunks.
  StepPlan p1;
  p1.seqs.push_back({1, 0, std::vector<int32_t>(a.begin(), a.begin() + 299), &kv.Pages(1), false});
  StepOutput o1;
  ASSERT_TRUE(exec.Run(p1, &o1).ok());
  int64_t b_pos = 0;
  for (int64_t step = 0; b_pos < 200; ++step) {
    StepPlan p;
    const int64_t a_pos = 299 + step;
    if (a_pos < 300) p.seqs.push_back({1, a_pos, {a[a_pos]}, &kv.Pages(1), false});
    const int64_t len = std::min<int64_t>(50, 200 - b_pos);
    p.seqs.push_back({2, b_pos, std::vector<int32_t>(b.begin() + b_pos, b.begin() + b_pos + len), &kv.Pages(2), false});
    StepOutput o;
    ASSERT_TRUE(exec.Run(p, &o).ok());
    size_t bi = 0;
    if (a_pos < 300) {
      for (int v = 0; v < m.vocab_size; ++v) ASSERT_NEAR(o.LastRow(0, p)[v], want_a[a_pos][v], kTol) << "a, id " << v;
      bi = 1;
    }
    const float* row = o.LastRow(bi, p);
    for (int v = 0; v < m.vocab_size; ++v) ASSERT_NEAR(row[v], want_b[b_pos + len - 1][v], kTol) << "b, id " << v;
    b_pos += len;
  }
}

}  // namespace
}  // namespace needle::engine
