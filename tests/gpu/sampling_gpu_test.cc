// GPU sampling (kernels/sampling.h) against the CPU reference (kernels/reference/sampling_ref.h, which
// tests/unit/sampling_ref_test.cc ties to engine::Sampler): for every combination of temperature,
// top-k, top-p, min-p and penalties, on random logits of several shapes (continuous, heavily tied,
// masked with -inf/NaN, with +inf), the kernel must pick the reference's token for the same u. u is
// constructed in the middle of a chosen candidate's probability interval, and logits whose top-p cut
// lies within 1e-9 of a cumulative boundary are redrawn, so that the last-bit differences of
// double-precision sums in another order cannot decide a case. Also greedy ties and log-softmax.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/reference/sampling_ref.h"
#include "kernels/sampling.h"
#include "tests/gpu/gpu_test_util.h"

namespace needle::kernels {
namespace {

namespace ref = reference;
using gpu_test::DeviceArray;

constexpr float kInf = std::numeric_limits<float>::infinity();

enum class LogitKind { kNormal, kTied, kSpiky, kMasked, kPlusInf, kCount };

const char* KindName(LogitKind k) {
  switch (k) {
    case LogitKind::kNormal:
      return "normal";
    case LogitKind::kTied:
      return "tied";
    case LogitKind::kSpiky:
      return "spiky";
    case LogitKind::kMasked:
      return "masked";
    case LogitKind::kPlusInf:
      return "+inf";
    default:
      return "?";
  }
}

std::vector<float> MakeLogits(LogitKind kind, int vocab, std::mt19937_64& rng) {
  std::vector<float> x(vocab);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int> level(-4, 2);
  std::uniform_int_distribution<int> id(0, vocab - 1);
  switch (kind) {
    case LogitKind::kNormal:
      for (float& v : x) v = normal(rng);
      break;
    case LogitKind::kTied:  // few distinct values: ties everywhere, including at every cut
      for (float& v : x) v = static_cast<float>(level(rng));
      break;
    case LogitKind::kSpiky:
      for (float& v : x) v = normal(rng) - 10.0f;
      for (int i = 0; i < 5; ++i) x[id(rng)] = 3.0f + normal(rng);
      break;
    case LogitKind::kMasked:
      for (float& v : x) v = normal(rng);
      for (int i = 0; i < vocab / 3; ++i) x[id(rng)] = -kInf;
      for (int i = 0; i < vocab / 10; ++i) x[id(rng)] = std::numeric_limits<float>::quiet_NaN();
      break;
    case LogitKind::kPlusInf:
      for (float& v : x) v = normal(rng);
      x[id(rng)] = kInf;
      x[id(rng)] = kInf;
      x[id(rng)] = kInf;
      break;
    default:
      break;
  }
  return x;
}

struct Row {
  ref::SamplingRowRef params;
  std::vector<ref::PenaltyEntryRef> history;
  std::vector<float> logits;
  double u = 0;
  int32_t want = 0;
  int32_t intended = -1;  // the candidate u was built for (-1: greedy or no candidates)
  std::string desc;
};

std::string Describe(const ref::SamplingRowRef& p, LogitKind kind, bool penalties) {
  std::ostringstream s;
  s << KindName(kind) << " logits, T " << p.temperature << " top_k " << p.top_k << " top_p " << p.top_p
    << " min_p " << p.min_p << (penalties ? " with penalties" : "");
  return s.str();
}

// True when the top-p cut of `row` on `penalized` is at least 1e-9 (relative) away from every
// cumulative boundary, and no probability is within 1e-12 of min_p.
bool AwayFromBoundaries(const ref::SamplingRowRef& row, const std::vector<float>& penalized) {
  if (row.temperature == 0.0f) return true;
  ref::SamplingRowRef unfiltered = row;
  unfiltered.top_p = 1.0f;
  unfiltered.min_p = 0.0f;
  const int vocab = static_cast<int>(penalized.size());
  const ref::CandidatesRef c = ref::SamplingCandidatesRef(unfiltered, penalized.data(), vocab);
  if (row.min_p > 0.0f) {
    for (double p : c.p) {
      if (std::fabs(p - row.min_p) < 1e-12) return false;
    }
  }
  if (row.top_p < 1.0f) {
    const double target = static_cast<double>(row.top_p) * c.mass;
    double cum = 0;
    for (double p : c.p) {
      cum += p;
      if (std::fabs(cum - target) < 1e-9 * c.mass) return false;
    }
  }
  return true;
}

// Builds one row: logits redrawn until away from boundaries; u in the middle of a candidate's interval.
Row MakeRow(const ref::SamplingRowRef& params, LogitKind kind, bool penalties, int vocab, std::mt19937_64& rng) {
  Row r;
  r.params = params;
  r.desc = Describe(params, kind, penalties);
  if (penalties) {
    std::uniform_int_distribution<int> id(0, vocab + 10);  // a few ids out of range: ignored
    std::uniform_int_distribution<int> count(0, 3);
    std::set<int> ids;
    while (ids.size() < 40) ids.insert(id(rng));
    for (int i : ids) r.history.push_back({i, count(rng)});
  }
  for (int attempt = 0; attempt < 100; ++attempt) {
    r.logits = MakeLogits(kind, vocab, rng);
    std::vector<float> penalized = r.logits;
    ref::ApplyPenaltiesRef(params, r.history, penalized.data(), vocab);
    if (!AwayFromBoundaries(params, penalized)) continue;
    const ref::CandidatesRef c = ref::SamplingCandidatesRef(params, penalized.data(), vocab);
    r.u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    if (!c.ids.empty()) {
      // Candidates with a visible share; the first few often, so that the top of the order is hit.
      std::vector<size_t> eligible;
      for (size_t i = 0; i < c.ids.size(); ++i) {
        if (c.p[i] >= 1e-6 * c.mass) eligible.push_back(i);
      }
      size_t pick = eligible[std::uniform_int_distribution<size_t>(0, eligible.size() - 1)(rng)];
      if (std::bernoulli_distribution(0.4)(rng)) pick = eligible[std::min<size_t>(eligible.size() - 1, rng() % 3)];
      double before = 0;
      for (size_t i = 0; i < pick; ++i) before += c.p[i];
      r.u = (before + 0.5 * c.p[pick]) / c.mass;
      r.intended = c.ids[pick];
      r.desc += ", candidate " + std::to_string(pick) + " of " + std::to_string(c.ids.size());
    }
    r.want = ref::SampleRef(params, r.history, r.logits.data(), vocab, r.u);
    return r;
  }
  r.logits.clear();  // signals failure to the caller
  return r;
}

// Runs LaunchSample on `rows` (logits row stride vocab + pad) and checks every token.
void ExpectGpuMatches(const std::vector<Row>& rows, int vocab, uint64_t seed) {
  const int batch = static_cast<int>(rows.size());
  const int64_t stride = vocab + 3;
  std::vector<float> logits(static_cast<size_t>(batch) * stride, 0.0f);
  std::vector<SamplingRow> params(batch);
  std::vector<int32_t> offsets = {0}, ids, counts;
  for (int b = 0; b < batch; ++b) {
    const Row& r = rows[b];
    std::copy(r.logits.begin(), r.logits.end(), logits.begin() + b * stride);
    SamplingRow& p = params[b];
    p.temperature = r.params.temperature;
    p.top_p = r.params.top_p;
    p.top_k = r.params.top_k;
    p.min_p = r.params.min_p;
    p.repetition_penalty = r.params.repetition_penalty;
    p.presence_penalty = r.params.presence_penalty;
    p.frequency_penalty = r.params.frequency_penalty;
    p.uniform = r.u;
    for (const ref::PenaltyEntryRef& e : r.history) {
      ids.push_back(e.id);
      counts.push_back(e.count);
    }
    offsets.push_back(static_cast<int32_t>(ids.size()));
  }
  DeviceArray<float> d_logits;
  DeviceArray<SamplingRow> d_params;
  DeviceArray<int32_t> d_offsets, d_ids, d_counts, d_tokens;
  DeviceArray<uint8_t> d_ws;
  NEEDLE_CUDA_ASSERT(d_logits.Upload(logits));
  NEEDLE_CUDA_ASSERT(d_params.Upload(params));
  NEEDLE_CUDA_ASSERT(d_offsets.Upload(offsets));
  NEEDLE_CUDA_ASSERT(d_ids.Upload(ids));
  NEEDLE_CUDA_ASSERT(d_counts.Upload(counts));
  NEEDLE_CUDA_ASSERT(d_tokens.Allocate(batch));
  NEEDLE_CUDA_ASSERT(d_tokens.Fill(0xFF));
  NEEDLE_CUDA_ASSERT(d_ws.Allocate(SampleWorkspaceBytes(batch, vocab)));
  SampleParams p;
  p.batch = batch;
  p.vocab = vocab;
  p.logits = d_logits.get();
  p.logits_stride = stride;
  p.rows = d_params.get();
  p.penalty_offsets = d_offsets.get();
  p.penalty_ids = d_ids.get();
  p.penalty_counts = d_counts.get();
  p.tokens = d_tokens.get();
  NEEDLE_CUDA_ASSERT(LaunchSample(p, d_ws.get(), nullptr));
  NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<int32_t> got;
  NEEDLE_CUDA_ASSERT(d_tokens.Download(&got));
  int mismatches = 0;
  for (int b = 0; b < batch; ++b) {
    if (got[b] != rows[b].want && ++mismatches <= 10) {
      ADD_FAILURE() << "seed " << seed << ", vocab " << vocab << ", row " << b << " (" << rows[b].desc
                    << ", u " << rows[b].u << "): GPU picked " << got[b] << ", reference " << rows[b].want;
    }
  }
  EXPECT_EQ(mismatches, 0) << "seed " << seed << ", vocab " << vocab << ": rows whose token differs, of "
                           << batch;
  // The logits must not have been modified (penalties go to the workspace).
  std::vector<float> after;
  NEEDLE_CUDA_ASSERT(d_logits.Download(&after));
  for (size_t i = 0; i < after.size(); ++i) {
    const bool same = after[i] == logits[i] || (std::isnan(after[i]) && std::isnan(logits[i]));
    ASSERT_TRUE(same) << "seed " << seed << ": logits modified at " << i;
  }
}

std::vector<ref::SamplingRowRef> FilterCombos() {
  std::vector<ref::SamplingRowRef> out;
  for (float t : {0.0f, 0.5f, 1.0f, 1.7f}) {
    for (int k : {0, 1, 7, 50, 1 << 30}) {
      for (float top_p : {1.0f, 0.9f, 0.3f}) {
        for (float min_p : {0.0f, 0.02f, 0.3f}) {
          ref::SamplingRowRef r;
          r.temperature = t;
          r.top_k = k;
          r.top_p = top_p;
          r.min_p = min_p;
          out.push_back(r);
        }
      }
    }
  }
  return out;
}

ref::SamplingRowRef WithPenalties(ref::SamplingRowRef r, std::mt19937_64& rng) {
  const float reps[] = {1.0f, 1.3f, 0.8f};
  r.repetition_penalty = reps[rng() % 3];
  r.presence_penalty = std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng);
  r.frequency_penalty = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
  return r;
}

void RunCombos(int vocab, uint64_t seed, int max_rows) {
  std::mt19937_64 rng(seed);
  std::vector<Row> rows;
  const std::vector<ref::SamplingRowRef> combos = FilterCombos();
  int index = 0;
  for (const ref::SamplingRowRef& base : combos) {
    for (bool penalties : {false, true}) {
      ++index;
      if (max_rows > 0 && static_cast<int>(rng() % (2 * combos.size())) >= max_rows) continue;
      const LogitKind kind = static_cast<LogitKind>(index % static_cast<int>(LogitKind::kCount));
      const ref::SamplingRowRef params = penalties ? WithPenalties(base, rng) : base;
      Row r = MakeRow(params, kind, penalties, vocab, rng);
      ASSERT_FALSE(r.logits.empty()) << "seed " << seed << ": no logits away from the boundaries for " << r.desc;
      if (r.intended >= 0) {
        ASSERT_EQ(r.want, r.intended) << "seed " << seed << ": u does not pick its candidate, " << r.desc;
      }
      rows.push_back(std::move(r));
    }
  }
  ASSERT_FALSE(rows.empty());
  ExpectGpuMatches(rows, vocab, seed);
}

TEST(SampleGpu, EveryFilterCombinationMatchesReferenceSmallVocab) {
  NEEDLE_SKIP_WITHOUT_GPU();
  for (uint64_t seed : {1u, 2u, 3u}) RunCombos(1000, seed, 0);
}

TEST(SampleGpu, EveryFilterCombinationMatchesReferenceLlamaVocab) {
  NEEDLE_SKIP_WITHOUT_GPU();
  RunCombos(32000, 7, 0);
}

TEST(SampleGpu, RandomFilterCombinationsMatchReferenceLargeVocab) {
  NEEDLE_SKIP_WITHOUT_GPU();
  RunCombos(128256, 9, 60);
  RunCombos(259, 10, 0);  // the demo presets' byte vocabulary: fewer ids than threads
}

TEST(SampleGpu, GreedyTiesGoToTheLowestIdAndMaskedRowsPickZero) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const int vocab = 128256;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<Row> rows;
  auto add = [&](std::vector<float> logits, float temperature, const std::string& desc) {
    Row r;
    r.params.temperature = temperature;
    r.logits = std::move(logits);
    r.u = 0.5;
    r.want = ref::SampleRef(r.params, {}, r.logits.data(), vocab, r.u);
    r.desc = desc;
    rows.push_back(std::move(r));
  };
  std::vector<float> ties(vocab, -1.0f);
  ties[127999] = ties[128000] = ties[70001] = 4.0f;
  add(ties, 0.0f, "greedy, max at 70001, 127999, 128000");
  std::vector<float> zeros(vocab, 0.0f);
  zeros[5] = -0.0f;
  add(zeros, 0.0f, "greedy, all zero");
  std::vector<float> late(vocab, -7.0f);
  late[0] = nan;
  add(late, 0.0f, "greedy, NaN first then ties");
  std::vector<float> masked(vocab, -kInf);
  masked[17] = nan;
  add(masked, 0.0f, "greedy, all masked");
  add(masked, 1.0f, "sampled, all masked");
  std::vector<float> neg_zero(vocab, -5.0f);
  neg_zero[9] = -0.0f;
  neg_zero[3] = 0.0f;
  add(neg_zero, 0.0f, "greedy, -0 and +0 tie");
  ASSERT_EQ(rows[0].want, 70001);
  ASSERT_EQ(rows[1].want, 0);
  ASSERT_EQ(rows[2].want, 1);
  ASSERT_EQ(rows[3].want, 0);
  ASSERT_EQ(rows[4].want, 0);
  ASSERT_EQ(rows[5].want, 3);
  ExpectGpuMatches(rows, vocab, 0);
}

TEST(SampleGpu, NoPenaltyArraysMeansNoPenalties) {
  NEEDLE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(5);
  const int vocab = 5000;
  ref::SamplingRowRef params;
  params.temperature = 0.8f;
  params.top_k = 100;
  const Row r = MakeRow(params, LogitKind::kNormal, false, vocab, rng);
  ASSERT_FALSE(r.logits.empty());
  DeviceArray<float> d_logits;
  DeviceArray<SamplingRow> d_params;
  DeviceArray<int32_t> d_tokens;
  DeviceArray<uint8_t> d_ws;
  SamplingRow row;
  row.temperature = params.temperature;
  row.top_k = params.top_k;
  row.uniform = r.u;
  NEEDLE_CUDA_ASSERT(d_logits.Upload(r.logits));
  NEEDLE_CUDA_ASSERT(d_params.Upload({row}));
  NEEDLE_CUDA_ASSERT(d_tokens.Allocate(1));
  NEEDLE_CUDA_ASSERT(d_ws.Allocate(SampleWorkspaceBytes(1, vocab)));
  SampleParams p;
  p.batch = 1;
  p.vocab = vocab;
  p.logits = d_logits.get();
  p.logits_stride = vocab;
  p.rows = d_params.get();
  p.tokens = d_tokens.get();
  NEEDLE_CUDA_ASSERT(LaunchSample(p, d_ws.get(), nullptr));
  NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<int32_t> got;
  NEEDLE_CUDA_ASSERT(d_tokens.Download(&got));
  EXPECT_EQ(got[0], r.want) << "seed 5: " << r.desc << ", u " << r.u;
}

// |a - e| <= 1e-4, and -inf exactly where the reference has -inf; no NaN.
::testing::AssertionResult LogprobsClose(const float* got, const float* want, int n, const std::string& what) {
  for (int i = 0; i < n; ++i) {
    const bool ok = std::isinf(want[i]) ? got[i] == want[i] : std::fabs(got[i] - want[i]) <= 1e-4f;
    if (!ok || std::isnan(got[i])) {
      return ::testing::AssertionFailure() << what << ": index " << i << " got " << got[i] << ", want " << want[i];
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(LogSoftmaxGpu, MatchesReferenceOutOfPlaceAndInPlace) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const uint64_t seed = 12;
  std::mt19937_64 rng(seed);
  for (int vocab : {259, 32000, 128256}) {
    std::vector<std::vector<float>> rows;
    for (int k = 0; k < static_cast<int>(LogitKind::kCount); ++k) {
      rows.push_back(MakeLogits(static_cast<LogitKind>(k), vocab, rng));
    }
    rows.push_back(std::vector<float>(vocab, -kInf));
    const int batch = static_cast<int>(rows.size());
    std::vector<float> flat, want(static_cast<size_t>(batch) * vocab);
    for (int b = 0; b < batch; ++b) {
      flat.insert(flat.end(), rows[b].begin(), rows[b].end());
      ref::LogSoftmaxRef(rows[b].data(), vocab, want.data() + static_cast<size_t>(b) * vocab);
    }
    DeviceArray<float> d_logits, d_out;
    NEEDLE_CUDA_ASSERT(d_logits.Upload(flat));
    NEEDLE_CUDA_ASSERT(d_out.Allocate(flat.size()));
    LogSoftmaxParams p;
    p.batch = batch;
    p.vocab = vocab;
    p.logits = d_logits.get();
    p.logits_stride = vocab;
    p.out = d_out.get();
    p.out_stride = vocab;
    NEEDLE_CUDA_ASSERT(LaunchLogSoftmax(p, nullptr));
    p.out = d_logits.get();  // then in place
    NEEDLE_CUDA_ASSERT(LaunchLogSoftmax(p, nullptr));
    NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
    std::vector<float> out, in_place;
    NEEDLE_CUDA_ASSERT(d_out.Download(&out));
    NEEDLE_CUDA_ASSERT(d_logits.Download(&in_place));
    for (int b = 0; b < batch; ++b) {
      const char* kind = b < static_cast<int>(LogitKind::kCount) ? KindName(static_cast<LogitKind>(b)) : "all -inf";
      const std::string what = "seed " + std::to_string(seed) + ", vocab " + std::to_string(vocab) + ", row " +
                               std::to_string(b) + " (" + kind + ")";
      const size_t at = static_cast<size_t>(b) * vocab;
      EXPECT_TRUE(LogprobsClose(out.data() + at, want.data() + at, vocab, what));
      EXPECT_TRUE(LogprobsClose(in_place.data() + at, want.data() + at, vocab, what + " in place"));
    }
  }
}

}  // namespace
}  // namespace needle::kernels
