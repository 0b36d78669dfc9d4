// Helpers shared by the executor test suites (cpu_executor_test, cuda_executor_gpu_test,
// cuda_graph_gpu_test): seeded token streams, the page size and shuffled pools the executor tests use,
// argmax, and the test-name suffix of a preset. Header-only; no GPU needed.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/kv_cache.h"
#include "engine/model_config.h"

namespace needle::engine::test {

// n token ids in [0, vocab), from a xorshift stream seeded by `seed`.
inline std::vector<int32_t> RandomTokens(int64_t n, int vocab, uint64_t seed) {
  std::vector<int32_t> t(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& v : t) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    v = static_cast<int32_t>(x % static_cast<uint64_t>(vocab));
  }
  return t;
}

// 64 tokens per page, or the smallest multiple of the selection block l' at or above 64 (NSA).
inline int PageTokens(const ModelConfig& m) {
  if (!m.IsNsa()) return 64;
  return m.nsa.sel_block >= 64 ? m.nsa.sel_block : ((64 + m.nsa.sel_block - 1) / m.nsa.sel_block) * m.nsa.sel_block;
}

// Pools for `seqs` sequences of `tokens` tokens plus spare pages, handed out in a seeded random order.
inline KvCacheConfig CacheFor(const ModelConfig& m, int64_t tokens, int seqs, uint64_t shuffle_seed) {
  KvCacheConfig c;
  c.page_tokens = PageTokens(m);
  c.shuffle_seed = shuffle_seed;
  const CacheLayout layout = CacheLayout::For(m, c);
  const std::vector<int64_t> need = layout.PagesFor(tokens);
  for (int p = 0; p < kNumPools; ++p) c.num_pages[p] = layout.has_pool[p] ? need[p] * seqs + 3 : 0;
  return c;
}

// The lowest id of the row's largest value.
inline int Argmax(const float* row, int vocab) {
  int best = 0;
  for (int v = 1; v < vocab; ++v) {
    if (row[v] > row[best]) best = v;
  }
  return best;
}

// Test-name suffix of a preset parameter ("tiny-nsa" -> "tiny_nsa").
inline std::string Name(const ::testing::TestParamInfo<std::string>& info) {
  std::string n = info.param;
  std::replace(n.begin(), n.end(), '-', '_');
  return n;
}

}  // namespace needle::engine::test
