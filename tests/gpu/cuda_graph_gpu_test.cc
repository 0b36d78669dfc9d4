// CUDA graphs of pure-decode steps (CudaExecutorConfig::cuda_graphs) against the same executor run
// launch by launch: CudaExecutors on the same weights, each with its own KvCacheManager fed the same
// calls (so all see the same page tables), run the same steps. The scripts make the graph path work:
// batches that pad (3 sequences in bucket 4, 5 and 6 in bucket 8), sequences joining (a mixed prefill
// + decode step, eager on every executor) and leaving so the bucket changes, compressed tokens
// completing in some steps and not in others, and pages reserved lazily, one at a time, so page
// tables grow between replays of one graph (selection pages, compressed pages, window-ring pages).
// Also: the padded step plan on the host, bucket limits, eager fallbacks for oversized and invalid
// steps, the engine with --cuda_graphs on and off, and decode-step timings (printed, not asserted).
//
// What must be equal, and why:
//   - a mixed step, and a pure-decode step that fills its bucket: graphs on == graphs off, bit for
//     bit. The graph replays the eager launches (only the page-table row stride differs, which moves
//     no arithmetic; a repeated compressed token writes the same bits);
//   - a padded step: graphs on == graphs off run with real filler sequences in place of the padding
//     (so at the bucket's batch), bit for bit, on the plan's rows. That shows the padding is inert;
//   - a padded step against graphs off at the plan's own batch: bit for bit, or else within fp32
//     accumulation-order differences (|d| <= 1e-5 + 1e-5 |e|) with the same argmax in every row. The
//     only thing a larger batch changes is a library's choice for the larger row count: cuBLASLt's
//     heuristic may pick another algorithm for the GEMMs (seen on the H100, CUDA 13: the fp32 lm_head
//     of `demo` at 5 rows vs 8 differs by <= 1e-6; every bf16 activation stays identical), as the
//     eager executor's own output for one sequence already depends on how many share its step. The
//     four tiny presets are bitwise equal there too; the summary line counts the steps that are not.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "engine/builder.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_executor.h"
#include "engine/cuda/step_plan.h"
#include "engine/kv_cache.h"
#include "engine/presets.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/support/executor_test_util.h"

namespace needle::engine::cuda {
namespace {

using ::needle::engine::test::Argmax;
using ::needle::engine::test::CacheFor;
using ::needle::engine::test::Name;
using ::needle::engine::test::RandomTokens;



// The bucket a batch of n decodes runs in: what CudaExecutor::graph_buckets() says.
int BucketOf(const std::vector<int>& buckets, int n) {
  return *std::lower_bound(buckets.begin(), buckets.end(), n);
}

// One sequence's part of a step.
struct Chunk {
  SeqId seq = 0;
  int64_t start = 0;
  std::vector<int32_t> tokens;
  bool all_logits = false;
};

// How the graphs-on logits of a step compare with the graphs-off ones.
struct StepCompare {
  bool bitwise = true;          // graphs on == graphs off, bit for bit
  bool filled_bitwise = true;   // graphs on == graphs off run at the bucket's batch (padded steps)
};

// fp32 accumulation-order level: what a different cuBLASLt algorithm for the same bf16 inputs gives.
constexpr double kFp32Atol = 1e-5, kFp32Rtol = 1e-5;

// The same model on three CudaExecutors, each with its own KvCacheManager that gets the same calls:
// graphs off (kEager), graphs on (kGraph), and graphs off again (kFilled), which runs every padded
// decode step with real filler sequences in place of the padding (each decoding token 0 at position
// 0 of its own page, over and over), so its batch is the bucket's, as in the graph.
class Twin {
 public:
  static constexpr int kEager = 0, kGraph = 1, kFilled = 2;

  Twin(const ModelWeights& w, const KvCacheConfig& cache, CudaExecutorConfig config)
      : model_(w.config),
        kv_{KvCacheManager(w.config, cache), KvCacheManager(w.config, cache), KvCacheManager(w.config, cache)} {
    for (int i = 0; i < 3; ++i) {
      config.cuda_graphs = i == kGraph;
      auto e = CudaExecutor::Create(w, cache, config);
      EXPECT_TRUE(e.ok()) << e.status();
      if (e.ok()) exec_[i] = std::move(e).value();
    }
  }

  bool ok() const { return exec_[0] != nullptr && exec_[1] != nullptr && exec_[2] != nullptr; }
  CudaExecutor& exec(int i) { return *exec_[i]; }
  const KvCacheManager& kv() const { return kv_[0]; }

  // Grows `seq` (new or not) on every manager to hold `tokens` tokens; pages are appended to its
  // tables only when a step needs them, as a lazily reserving engine would. Returns whether any
  // table grew.
  bool Reserve(SeqId seq, int64_t tokens) {
    bool grew = false;
    for (KvCacheManager& kv : kv_) {
      size_t before = 0;
      if (kv.Contains(seq)) {
        for (const auto& t : kv.Pages(seq).table) before += t.size();
      }
      auto r = kv.Plan(seq, tokens);
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) return false;
      kv.Commit(*r);
      size_t after = 0;
      for (const auto& t : kv.Pages(seq).table) after += t.size();
      grew = grew || (before > 0 && after > before);
    }
    return grew;
  }
  void Release(SeqId seq) {
    for (KvCacheManager& kv : kv_) kv.Release(seq);
  }

  // Runs the step on the three executors. `bucket` is the graph bucket of a pure-decode step (0 for
  // a mixed one). Fails on a run error, NaN, a graphs-on row that differs from the filled run's (a
  // padded step) or from the eager one's (a step that fills its bucket, or a mixed step), or a padded
  // step beyond fp32 accumulation-order differences from the eager run or with another argmax.
  // `eager` gets the graphs-off output whenever the runs succeeded.
  ::testing::AssertionResult Step(const std::vector<Chunk>& chunks, int bucket, const std::string& what,
                                  StepOutput* eager, StepCompare* cmp) {
    *cmp = StepCompare{};
    const int n = static_cast<int>(chunks.size());
    const bool padded = bucket > n;
    StepOutput out[3];
    for (int i = 0; i < 3; ++i) {
      StepPlan plan;
      for (const Chunk& c : chunks) plan.seqs.push_back({c.seq, c.start, c.tokens, &kv_[i].Pages(c.seq), c.all_logits});
      if (i == kFilled && padded) {
        for (SeqId f = kFiller; f < kFiller + bucket - n; ++f) {
          if (!kv_[i].Contains(f)) {
            auto r = kv_[i].Plan(f, 1);
            if (!r.ok()) return ::testing::AssertionFailure() << what << ": filler pages: " << r.status();
            kv_[i].Commit(*r);
          }
          plan.seqs.push_back({f, 0, {0}, &kv_[i].Pages(f), false});
        }
      }
      const absl::Status st = exec_[i]->Run(plan, &out[i]);
      if (!st.ok()) return ::testing::AssertionFailure() << what << ": executor " << i << ": " << st;
    }
    const int V = out[0].vocab;
    const size_t real = out[0].logits.size();
    if (out[0].first_row != out[1].first_row || out[1].logits.size() != real || out[1].vocab != V ||
        out[2].logits.size() < real) {
      return ::testing::AssertionFailure() << what << ": the outputs differ in shape";
    }
    *eager = out[0];
    ++compared_steps_;
    for (size_t k = 0; k < real; ++k) {
      if (std::isnan(out[0].logits[k]) || std::isnan(out[1].logits[k])) {
        return ::testing::AssertionFailure() << what << ": NaN in row " << k / V;
      }
    }
    const auto differ = [&](const std::vector<float>& a, const std::vector<float>& b, const char* which) {
      size_t count = 0, first = 0;
      double worst = 0;
      for (size_t k = 0; k < real; ++k) {
        if (std::memcmp(&a[k], &b[k], sizeof(float)) == 0) continue;
        if (count++ == 0) first = k;
        worst = std::max(worst, std::fabs(static_cast<double>(a[k]) - b[k]));
      }
      std::ostringstream m;
      m << what << ": " << count << " of " << real << " logits differ between graphs on and " << which
        << " (first in row " << first / V << ", id " << first % V << ": " << b[first] << " vs " << a[first]
        << "; largest difference " << worst << ")";
      return m.str();
    };
    cmp->bitwise = std::memcmp(out[0].logits.data(), out[1].logits.data(), real * sizeof(float)) == 0;
    cmp->filled_bitwise = std::memcmp(out[2].logits.data(), out[1].logits.data(), real * sizeof(float)) == 0;
    if (!cmp->filled_bitwise) return ::testing::AssertionFailure() << differ(out[2].logits, out[1].logits, "off at the bucket's batch");
    if (cmp->bitwise) return ::testing::AssertionSuccess();
    if (!padded) return ::testing::AssertionFailure() << differ(out[0].logits, out[1].logits, "off");
    for (size_t k = 0; k < real; ++k) {
      const double e = out[0].logits[k], g = out[1].logits[k];
      if (std::fabs(g - e) > kFp32Atol + kFp32Rtol * std::fabs(e)) {
        return ::testing::AssertionFailure() << "beyond fp32 rounding: " << differ(out[0].logits, out[1].logits, "off");
      }
    }
    for (size_t r = 0; r * V < real; ++r) {
      if (Argmax(out[0].logits.data() + r * V, V) != Argmax(out[1].logits.data() + r * V, V)) {
        return ::testing::AssertionFailure() << "another argmax in row " << r << ": "
                                             << differ(out[0].logits, out[1].logits, "off");
      }
    }
    return ::testing::AssertionSuccess();
  }

  int64_t compared_steps() const { return compared_steps_; }

 private:
  static constexpr SeqId kFiller = 100000;  // ids of the filler sequences
  ModelConfig model_;
  KvCacheManager kv_[3];
  std::unique_ptr<CudaExecutor> exec_[3];
  int64_t compared_steps_ = 0;
};

CudaExecutorConfig SmallConfig() {
  CudaExecutorConfig c;
  c.max_tokens_per_step = 512;
  c.max_seqs_per_step = 8;  // buckets 1, 2, 4, 8
  return c;
}

// A live sequence of a script: its prompt, how much of it (and of its output) is cached, the next
// token to feed.
struct Live {
  SeqId id = 0;
  std::vector<int32_t> prompt;
  int64_t pos = 0;     // tokens in the cache
  int32_t next = -1;   // the next decode token (the eager argmax), once the prompt is done
};

// Runs the sequences through steps like the engine: prefill chunks of at most `chunk` tokens for those
// still in their prompt, one decode for the others; every token fed is the eager run's greedy choice.
class Script {
 public:
  Script(Twin* twin, const ModelConfig& m, std::string tag) : twin_(twin), m_(m), tag_(std::move(tag)) {}

  void Join(SeqId id, int64_t prompt_len) {
    Live l;
    l.id = id;
    l.prompt = RandomTokens(prompt_len, std::min(m_.vocab_size, 256), 1000 + static_cast<uint64_t>(id));
    live_.push_back(std::move(l));
  }
  void Leave(SeqId id) {
    live_.erase(std::remove_if(live_.begin(), live_.end(), [&](const Live& l) { return l.id == id; }), live_.end());
    twin_->Release(id);
  }

  // One step over every live sequence. Returns false (with a test failure) when a run failed; a
  // difference between graphs on and off is a test failure too (the first few are reported) but the
  // script goes on, fed by the eager run, so the summary says which steps differ.
  bool Step(int64_t chunk) {
    std::vector<Chunk> chunks;
    bool pure_decode = true;
    int64_t items = 0;
    for (Live& l : live_) {
      Chunk c;
      c.seq = l.id;
      c.start = l.pos;
      const int64_t plen = static_cast<int64_t>(l.prompt.size());
      if (l.pos < plen) {
        const int64_t len = std::min(chunk, plen - l.pos);
        c.tokens.assign(l.prompt.begin() + l.pos, l.prompt.begin() + l.pos + len);
        c.all_logits = (l.id % 2) == 0;  // some chunks want every row
        if (len > 1) pure_decode = false;
      } else {
        c.tokens = {l.next};
      }
      if (c.tokens.size() == 1 && m_.IsNsa() && m_.nsa.CompletesCompressed(c.start)) ++items;
      if (twin_->Reserve(l.id, c.start + static_cast<int64_t>(c.tokens.size()))) ++growths_;
      chunks.push_back(std::move(c));
    }
    std::ostringstream what;
    what << tag_ << ", step " << steps_ << " (" << chunks.size() << " sequences, "
         << (pure_decode ? "pure decode" : "mixed") << ")";
    bool padded = false;
    if (pure_decode) {
      const int bucket = BucketOf(twin_->exec(Twin::kGraph).graph_buckets(), static_cast<int>(chunks.size()));
      int ib = 0;
      if (items > 0) {
        ib = 1;
        while (ib < items) ib *= 2;
        ib = std::min(ib, bucket);
      }
      keys_.insert({bucket, ib});
      batches_.insert(static_cast<int>(chunks.size()));
      padded = bucket != static_cast<int>(chunks.size());
      if (padded) ++padded_steps_;
      if (items > 0) ++steps_with_items_;
      what << " bucket " << bucket << (bucket != static_cast<int>(chunks.size()) ? " (padded)" : "") << ", "
           << items << " compressed tokens";
    }
    StepOutput out;
    StepCompare cmp;
    const int bucket =
        pure_decode ? BucketOf(twin_->exec(Twin::kGraph).graph_buckets(), static_cast<int>(chunks.size())) : 0;
    const ::testing::AssertionResult r = twin_->Step(chunks, bucket, what.str(), &out, &cmp);
    if (out.logits.empty()) {
      ADD_FAILURE() << r.message();
      return false;
    }
    if (!r) {
      ++failed_steps_;
      if (failed_steps_ <= 5) ADD_FAILURE() << r.message();
    } else if (!cmp.bitwise) {
      ++padded_fp32_steps_;
      if (padded_fp32_steps_ == 1) std::printf("  first padded step not bitwise equal to graphs off: %s\n", what.str().c_str());
    }
    for (size_t i = 0; i < chunks.size(); ++i) {
      Live& l = live_[i];
      l.pos += static_cast<int64_t>(chunks[i].tokens.size());
      const int64_t row = out.first_row[i] + (chunks[i].all_logits ? static_cast<int64_t>(chunks[i].tokens.size()) - 1 : 0);
      if (l.pos >= static_cast<int64_t>(l.prompt.size())) l.next = Argmax(out.logits.data() + row * out.vocab, out.vocab);
    }
    ++steps_;
    if (pure_decode) ++decode_steps_;
    return true;
  }

  // Steps that failed Twin::Step's comparison.
  int64_t failed_steps() const { return failed_steps_; }
  // Padded steps equal to the filled run bit for bit but to the eager run only up to fp32 rounding.
  int64_t padded_fp32_steps() const { return padded_fp32_steps_; }

  int64_t decode_steps() const { return decode_steps_; }
  int64_t padded_steps() const { return padded_steps_; }
  int64_t steps_with_items() const { return steps_with_items_; }
  int64_t growths() const { return growths_; }
  const std::set<std::pair<int, int>>& keys() const { return keys_; }
  const std::set<int>& batches() const { return batches_; }
  size_t live() const { return live_.size(); }

 private:
  Twin* twin_;
  ModelConfig m_;
  std::string tag_;
  std::vector<Live> live_;
  int64_t steps_ = 0, decode_steps_ = 0, padded_steps_ = 0, steps_with_items_ = 0, growths_ = 0;
  int64_t failed_steps_ = 0, padded_fp32_steps_ = 0;
  std::set<std::pair<int, int>> keys_;
  std::set<int> batches_;
};

// Checks the executors' graph counters against what the script ran.
void ExpectGraphUse(Twin& twin, const Script& script) {
  const CudaExecutor::GraphStats eager = twin.exec(Twin::kEager).graph_stats();
  const CudaExecutor::GraphStats graph = twin.exec(Twin::kGraph).graph_stats();
  EXPECT_TRUE(twin.exec(Twin::kEager).graph_buckets().empty());
  EXPECT_EQ(eager.captures, 0);
  EXPECT_EQ(eager.replays, 0);
  EXPECT_EQ(graph.failures, 0) << "a capture failed: see the warning above";
  EXPECT_EQ(graph.invalidations, 0);
  EXPECT_EQ(graph.replays, script.decode_steps()) << "every pure-decode step runs as a graph";
  EXPECT_EQ(graph.captures, static_cast<int64_t>(script.keys().size())) << "one capture per (bucket, items) key";
  EXPECT_EQ(graph.live_graphs, static_cast<int>(script.keys().size()));
  EXPECT_EQ(graph.eager_steps, twin.compared_steps() - script.decode_steps());
  EXPECT_EQ(script.failed_steps(), 0) << "steps whose graphs-on logits are not what they must be (see above)";
  std::ostringstream keys;
  for (const auto& [b, i] : script.keys()) keys << " (" << b << "," << i << ")";
  std::printf("  %lld steps compared, %lld pure decode (%lld padded, %lld completing compressed tokens), %lld page-table "
              "growths; graphs (bucket, items):%s; padded steps bitwise only at the bucket's batch: %lld; "
              "failed: %lld\n",
              static_cast<long long>(twin.compared_steps()), static_cast<long long>(script.decode_steps()),
              static_cast<long long>(script.padded_steps()), static_cast<long long>(script.steps_with_items()),
              static_cast<long long>(script.growths()), keys.str().c_str(),
              static_cast<long long>(script.padded_fp32_steps()), static_cast<long long>(script.failed_steps()));
}

// ---- Graphs on and off, bitwise ------------------------------------------------------------------

class GraphVsEager : public ::testing::TestWithParam<std::string> {};

// Sequences join and leave so that pure-decode batches of 3, 4, 6, 5, 2, 1, 2 and 5 sequences run in
// buckets 4, 4, 8, 8, 2, 1, 2 and 8, with mixed prefill steps at every join.
TEST_P(GraphVsEager, DecodeStepsWithJoinsAndLeavesAreBitwiseEqual) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::string preset = GetParam();
  auto w = MakePresetWeights(preset, 7);
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelConfig& m = w->config;
  Twin twin(*w, CacheFor(m, 400, 12, 99), SmallConfig());
  ASSERT_TRUE(twin.ok());
  ASSERT_EQ(twin.exec(Twin::kGraph).graph_buckets(), (std::vector<int>{1, 2, 4, 8}));
  Script script(&twin, m, preset);

  // (decode steps done, what happens then)
  struct Event {
    int64_t at;
    std::vector<std::pair<SeqId, int64_t>> join;
    std::vector<SeqId> leave;
  };
  const std::vector<Event> events = {
      {0, {{1, 37}, {2, 70}, {3, 101}}, {}},  // 3 decodes: bucket 4, padded
      {12, {{4, 45}}, {}},                    // 4: bucket 4 exactly
      {22, {{5, 20}, {6, 90}}, {}},           // 6: bucket 8, padded
      {34, {}, {2}},                          // 5: bucket 8, padded
      {44, {}, {1, 3, 4}},                    // 2: bucket 2
      {52, {}, {5}},                          // 1: bucket 1
      {60, {{7, 130}}, {}},                   // 2 again, after a long mixed prefill
      {68, {{8, 5}, {9, 1}, {10, 9}}, {}},    // 5 (one joins with a one-token prompt)
  };
  size_t next_event = 0;
  while (script.decode_steps() < 80) {
    while (next_event < events.size() && events[next_event].at == script.decode_steps()) {
      for (const auto& [id, len] : events[next_event].join) script.Join(id, len);
      for (SeqId id : events[next_event].leave) script.Leave(id);
      ++next_event;
    }
    ASSERT_TRUE(script.Step(/*chunk=*/48));
  }
  EXPECT_GE(script.decode_steps(), 64);
  EXPECT_EQ(script.batches(), (std::set<int>{1, 2, 3, 4, 5, 6}));
  EXPECT_GT(script.padded_steps(), 20);
  if (m.IsNsa()) {
    EXPECT_GT(script.steps_with_items(), 0);
  }
  ExpectGraphUse(twin, script);
}

// Sequences decoding across page boundaries while a graph is replayed: the pages are reserved one at
// a time, so a sequence's tables (selection, compressed, window ring) gain entries between two
// replays of the same graph, which must read the new entries from the re-uploaded plan.
TEST_P(GraphVsEager, ReplayAfterPageTablesGrowMatchesEager) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::string preset = GetParam();
  auto w = MakePresetWeights(preset, 3);
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelConfig& m = w->config;
  Twin twin(*w, CacheFor(m, 600, 4, 5), SmallConfig());
  ASSERT_TRUE(twin.ok());
  Script script(&twin, m, preset + " page growth");
  // Sequence 1 starts just below a selection page boundary (64 tokens per page in these presets) and
  // decodes across two; sequence 2 starts short, so its window ring and compressed tables grow too.
  script.Join(1, 250);
  script.Join(2, 60);
  script.Join(3, 1);
  while (script.decode_steps() < 100) ASSERT_TRUE(script.Step(/*chunk=*/256));
  // Every 64 positions a selection page per sequence, plus compressed and window-ring pages.
  EXPECT_GE(script.growths(), 4);
  const SequencePages& p1 = twin.kv().Pages(1);
  EXPECT_GE(p1.table[static_cast<int>(Pool::kSelection)].size(), 6u);  // grew from 4 to 6 pages
  ExpectGraphUse(twin, script);
}

INSTANTIATE_TEST_SUITE_P(Presets, GraphVsEager,
                         ::testing::Values("tiny-nsa", "tiny-llama-nsa", "tiny-nsa-paper", "tiny-llama", "demo"), Name);

// ---- Buckets and limits --------------------------------------------------------------------------

TEST(CudaGraphs, BucketsFollowTheLimits) {
  NEEDLE_SKIP_WITHOUT_GPU();
  auto w = MakePresetWeights("tiny-nsa-paper", 1);
  ASSERT_TRUE(w.ok());
  const KvCacheConfig cache = CacheFor(w->config, 300, 2, 0);
  CudaExecutorConfig c = SmallConfig();
  c.max_seqs_per_step = 48;
  auto e = CudaExecutor::Create(*w, cache, c);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->graph_buckets(), (std::vector<int>{1, 2, 4, 8, 16, 32, 48}));
  c.max_logit_rows = 6;  // one logits pass per graph: the logits buffer bounds the buckets
  e = CudaExecutor::Create(*w, cache, c);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->graph_buckets(), (std::vector<int>{1, 2, 4, 6}));
  c.cuda_graphs = false;
  e = CudaExecutor::Create(*w, cache, c);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_TRUE((*e)->graph_buckets().empty());
}

// More sequences than the largest bucket, and invalid decode steps, go the eager way (which reports
// the error as before); the executor keeps replaying afterwards.
TEST(CudaGraphs, InvalidAndOversizedStepsRunEagerly) {
  NEEDLE_SKIP_WITHOUT_GPU();
  auto w = MakePresetWeights("tiny-nsa", 2);
  ASSERT_TRUE(w.ok());
  const ModelConfig& m = w->config;
  const KvCacheConfig cache = CacheFor(m, 200, 6, 3);
  CudaExecutorConfig c = SmallConfig();
  c.max_seqs_per_step = 6;
  c.max_logit_rows = 4;  // buckets 1, 2, 4: five or six decodes run eagerly
  auto e = CudaExecutor::Create(*w, cache, c);
  ASSERT_TRUE(e.ok()) << e.status();
  CudaExecutor& exec = **e;
  KvCacheManager kv(m, cache);
  for (SeqId s = 0; s < 6; ++s) {
    auto r = kv.Plan(s, 200);
    ASSERT_TRUE(r.ok());
    kv.Commit(*r);
  }
  StepPlan prefill;
  for (SeqId s = 0; s < 6; ++s) prefill.seqs.push_back({s, 0, RandomTokens(20, 256, s), &kv.Pages(s), false});
  StepOutput out;
  ASSERT_TRUE(exec.Run(prefill, &out).ok());
  StepPlan six, bad_token, bad_pos;
  for (SeqId s = 0; s < 6; ++s) six.seqs.push_back({s, 20, {5}, &kv.Pages(s), false});
  bad_token.seqs.push_back({0, 21, {m.vocab_size}, &kv.Pages(0), false});
  bad_pos.seqs.push_back({0, -3, {1}, &kv.Pages(0), false});
  absl::Status st = exec.Run(six, &out);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(out.logits.size(), 6u * m.vocab_size);
  EXPECT_EQ(exec.graph_stats().replays, 0);
  EXPECT_EQ(exec.Run(bad_token, &out).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(exec.Run(bad_pos, &out).code(), absl::StatusCode::kInvalidArgument);
  StepPlan three;
  for (SeqId s = 0; s < 3; ++s) three.seqs.push_back({s, 21, {7}, &kv.Pages(s), false});
  st = exec.Run(three, &out);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(out.logits.size(), 3u * m.vocab_size);
  for (float f : out.logits) ASSERT_FALSE(std::isnan(f));
  EXPECT_EQ(exec.graph_stats().replays, 1);
  EXPECT_EQ(exec.graph_stats().captures, 1);
  EXPECT_EQ(exec.graph_stats().failures, 0);
}

// A capture that fails (here: invalidated on purpose by a call that is illegal while capturing) logs
// one warning, marks its key eager for good and runs the step eagerly: the logits are bitwise those
// of an executor with graphs off, and the executor keeps working.
TEST(CudaGraphs, CaptureFailureFallsBackToEagerWithTheSameLogits) {
  NEEDLE_SKIP_WITHOUT_GPU();
  auto w = MakePresetWeights("tiny-nsa-paper", 4);
  ASSERT_TRUE(w.ok());
  const ModelConfig& m = w->config;
  const KvCacheConfig cache = CacheFor(m, 300, 3, 8);
  CudaExecutorConfig c = SmallConfig();
  c.cuda_graphs = false;
  auto eager = CudaExecutor::Create(*w, cache, c);
  c.cuda_graphs = true;
  c.fail_graph_captures = true;
  auto failing = CudaExecutor::Create(*w, cache, c);
  ASSERT_TRUE(eager.ok()) << eager.status();
  ASSERT_TRUE(failing.ok()) << failing.status();
  KvCacheManager kv_e(m, cache), kv_f(m, cache);
  for (KvCacheManager* kv : {&kv_e, &kv_f}) {
    for (SeqId s = 0; s < 3; ++s) {
      auto r = kv->Plan(s, 300);
      ASSERT_TRUE(r.ok());
      kv->Commit(*r);
    }
  }
  int32_t next[3] = {0, 0, 0};
  for (int step = 0; step < 12; ++step) {
    StepOutput oe, of;
    StepPlan pe, pf;
    for (SeqId s = 0; s < 3; ++s) {
      // Step 0 prefills 40 tokens each; then every step decodes (bucket 4, padded).
      std::vector<int32_t> toks = step == 0 ? RandomTokens(40, 256, 20 + s) : std::vector<int32_t>{next[s]};
      const int64_t start = step == 0 ? 0 : 39 + step;
      pe.seqs.push_back({s, start, toks, &kv_e.Pages(s), false});
      pf.seqs.push_back({s, start, toks, &kv_f.Pages(s), false});
    }
    absl::Status st = (*eager)->Run(pe, &oe);
    ASSERT_TRUE(st.ok()) << st;
    st = (*failing)->Run(pf, &of);
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st;
    ASSERT_EQ(oe.logits.size(), of.logits.size());
    ASSERT_EQ(std::memcmp(oe.logits.data(), of.logits.data(), oe.logits.size() * sizeof(float)), 0) << "step " << step;
    for (SeqId s = 0; s < 3; ++s) next[s] = Argmax(oe.Row(s), oe.vocab);
  }
  const CudaExecutor::GraphStats g = (*failing)->graph_stats();
  EXPECT_EQ(g.replays, 0);
  EXPECT_EQ(g.captures, 0);
  EXPECT_GE(g.failures, 1);
  EXPECT_LE(g.failures, 2);  // one per key tried: (4, 0) and maybe (4, 1); never retried
  EXPECT_EQ(g.live_graphs, 0);
  EXPECT_EQ(g.eager_steps, 12);
}

// ---- The padded step plan (host only, no GPU) ---------------------------------------------------

// Two different decode steps padded to the same key get byte-identical layouts; the padding rows
// read and write nothing (position -1, poison tables, -1 slots); padding compressed tokens repeat
// the first real one; only the plan's rows are output rows.
TEST(PaddedStepPlan, SameKeySameLayoutAndInertPadding) {
  auto cfg = PresetConfig("tiny-nsa-paper");  // window ring, staging ring, MLP compression
  ASSERT_TRUE(cfg.ok());
  const ModelConfig& m = *cfg;
  const KvCacheConfig cache = CacheFor(m, 600, 6, 31);
  KvCacheManager kv(m, cache);
  for (SeqId s = 0; s < 5; ++s) {
    auto r = kv.Plan(s, 100 + 100 * s);
    ASSERT_TRUE(r.ok());
    kv.Commit(*r);
  }
  PlanLimits limits;
  limits.max_tokens = 64;
  limits.max_seqs = 8;
  limits.max_context = 1024;
  const PlanGeometry geo = PlanGeometry::For(m, cache, limits);
  DecodePadding pad;
  pad.num_seqs = 8;
  pad.num_items = 2;
  const std::vector<int64_t> stride = geo.layout.PagesFor(limits.max_context);
  for (int p = 0; p < kNumPools; ++p) pad.table_stride[p] = geo.layout.has_pool[p] ? static_cast<int32_t>(stride[p]) : 0;

  // Positions that complete a compressed token (l = 8, d = 4): t = 4i + 7.
  ASSERT_TRUE(m.nsa.CompletesCompressed(99));
  ASSERT_FALSE(m.nsa.CompletesCompressed(98));
  StepPlan a, b;
  a.seqs.push_back({0, 99, {3}, &kv.Pages(0), false});   // completes one
  a.seqs.push_back({2, 150, {4}, &kv.Pages(2), true});   // one token, all_logits: one row
  a.seqs.push_back({1, 98, {5}, &kv.Pages(1), false});
  b.seqs.push_back({4, 399, {6}, &kv.Pages(4), false});  // completes one
  b.seqs.push_back({3, 299, {7}, &kv.Pages(3), false});  // completes one
  b.seqs.push_back({0, 12, {8}, &kv.Pages(0), false});
  b.seqs.push_back({1, 0, {9}, &kv.Pages(1), false});
  b.seqs.push_back({2, 17, {9}, &kv.Pages(2), false});
  auto la = LayoutStepPlan(a, geo, &pad), lb = LayoutStepPlan(b, geo, &pad);
  ASSERT_TRUE(la.ok()) << la.status();
  ASSERT_TRUE(lb.ok()) << lb.status();
  for (const StepPlanLayout* l : {&*la, &*lb}) {
    EXPECT_EQ(l->num_seqs, 8);
    EXPECT_EQ(l->num_tokens, 8);
    EXPECT_EQ(l->num_decodes, 8);
    EXPECT_EQ(l->num_items, 2);
    EXPECT_EQ(l->num_logit_rows, 8);
    for (int p = 0; p < kNumPools; ++p) EXPECT_EQ(l->table_stride[p], pad.table_stride[p]);
  }
  // Every offset and count the launches see is the same.
  EXPECT_EQ(la->bytes, lb->bytes);
  EXPECT_EQ(la->positions, lb->positions);
  EXPECT_EQ(la->sel_slots, lb->sel_slots);
  EXPECT_EQ(la->stg_slots, lb->stg_slots);
  EXPECT_EQ(la->items, lb->items);
  EXPECT_EQ(la->logit_rows, lb->logit_rows);
  for (int p = 0; p < kNumPools; ++p) EXPECT_EQ(la->tables[p], lb->tables[p]);
  EXPECT_EQ(la->plan_seqs, 3);
  EXPECT_EQ(la->plan_items, 1);
  EXPECT_EQ(la->output_rows, 3);
  EXPECT_EQ(la->first_row, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(lb->plan_items, 2);

  std::vector<int64_t> storage(la->bytes / 8 + 1, -7);
  char* base = reinterpret_cast<char*>(storage.data());
  WriteStepPlan(a, geo, *la, base);
  const int32_t* pos = PlanAt<int32_t>(base, la->positions);
  const int32_t* ids = PlanAt<int32_t>(base, la->token_ids);
  const int32_t* start = PlanAt<int32_t>(base, la->start_pos);
  const int32_t* cu = PlanAt<int32_t>(base, la->cu_tokens);
  const int64_t* sel = PlanAt<int64_t>(base, la->sel_slots);
  const int64_t* win = PlanAt<int64_t>(base, la->win_slots);
  const int64_t* stg = PlanAt<int64_t>(base, la->stg_slots);
  const int32_t* rows = PlanAt<int32_t>(base, la->logit_rows);
  EXPECT_EQ(std::vector<int32_t>(pos, pos + 3), (std::vector<int32_t>{99, 150, 98}));
  EXPECT_EQ(std::vector<int32_t>(ids, ids + 3), (std::vector<int32_t>{3, 4, 5}));
  for (int s = 3; s < 8; ++s) {
    EXPECT_EQ(pos[s], -1) << s;
    EXPECT_EQ(start[s], -1) << s;
    EXPECT_EQ(ids[s], 0) << s;
    EXPECT_EQ(sel[s], -1) << s;
    EXPECT_EQ(win[s], -1) << s;
    EXPECT_EQ(stg[s], -1) << s;
    for (int p = 0; p < kNumPools; ++p) {
      if (!geo.layout.has_pool[p]) continue;
      const int32_t* row = PlanAt<int32_t>(base, la->tables[p]) + s * la->table_stride[p];
      for (int i = 0; i < la->table_stride[p]; ++i) EXPECT_EQ(row[i], cache.num_pages[p]) << "pool " << p;
    }
  }
  for (int s = 0; s <= 8; ++s) EXPECT_EQ(cu[s], s);
  for (int r = 0; r < 8; ++r) EXPECT_EQ(rows[r], r);
  // Real rows keep their tables, padded with the poison page up to the fixed stride.
  const int32_t* sel_table = PlanAt<int32_t>(base, la->tables[0]) + 1 * la->table_stride[0];
  const auto& real = kv.Pages(2).table[0];
  for (int i = 0; i < la->table_stride[0]; ++i) {
    EXPECT_EQ(sel_table[i], i < static_cast<int>(real.size()) ? real[i] : cache.num_pages[0]);
  }
  const kernels::CompressItem* items = PlanAt<kernels::CompressItem>(base, la->items);
  EXPECT_EQ(items[0].start, 92);  // compressed token 23: rows 92..99
  EXPECT_EQ(std::memcmp(&items[0], &items[1], sizeof(kernels::CompressItem)), 0);

  // What the padding cannot take.
  StepPlan mixed = a;
  mixed.seqs[1].tokens = {1, 2};
  EXPECT_EQ(LayoutStepPlan(mixed, geo, &pad).status().code(), absl::StatusCode::kFailedPrecondition);
  DecodePadding none = pad;
  none.num_items = 0;
  EXPECT_EQ(LayoutStepPlan(a, geo, &none).status().code(), absl::StatusCode::kFailedPrecondition);
  DecodePadding small = pad;
  small.num_seqs = 2;
  EXPECT_EQ(LayoutStepPlan(a, geo, &small).status().code(), absl::StatusCode::kFailedPrecondition);
  DecodePadding short_table = pad;
  short_table.table_stride[0] = 1;
  EXPECT_EQ(LayoutStepPlan(a, geo, &short_table).status().code(), absl::StatusCode::kFailedPrecondition);
  // Validation comes first: a bad step is INVALID_ARGUMENT padded or not.
  StepPlan bad = a;
  bad.seqs[0].tokens = {m.vocab_size};
  EXPECT_EQ(LayoutStepPlan(bad, geo, &pad).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- The engine with --cuda_graphs on and off ------------------------------------------------------

struct Collected {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int32_t> tokens;
  absl::Status status;
  bool done = false;

  EventSink Sink() {
    return [this](RequestEvent&& ev) {
      std::lock_guard<std::mutex> lock(mu);
      tokens.insert(tokens.end(), ev.token_ids.begin(), ev.token_ids.end());
      if (ev.kind == RequestEvent::Kind::kFinished) {
        status = ev.status;
        done = true;
        cv.notify_all();
      }
    };
  }
  bool Wait() {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(120), [&] { return done; });
  }
};

std::vector<std::vector<int32_t>> Generate(bool graphs, const std::vector<std::vector<int32_t>>& prompts) {
  CudaBackendOptions options;
  options.cuda_graphs = graphs;
  RegisterCudaBackend(options);
  EngineOptions o;
  o.model = "tiny-nsa-paper";
  o.model_seed = 5;
  o.backend = "cuda";
  o.kv_cache_bytes = 64ll << 20;
  o.max_seq_tokens = 1024;
  o.kv_shuffle_seed = 17;
  o.engine.max_batch = 4;
  o.engine.prefill_chunk = 48;
  o.engine.step_token_budget = 128;
  o.engine.stats_log_interval_s = 0;
  auto e = BuildEngine(o);
  EXPECT_TRUE(e.ok()) << e.status();
  if (!e.ok()) return {};
  std::vector<std::unique_ptr<Collected>> got;
  for (size_t i = 0; i < prompts.size(); ++i) {
    Request r;
    r.prompt = prompts[i];
    r.sampling.temperature = 0;
    r.stopping.max_tokens = 30 + 7 * static_cast<int64_t>(i);  // they finish at different steps
    r.stopping.ignore_eos = true;
    got.push_back(std::make_unique<Collected>());
    EXPECT_TRUE((*e)->Submit(std::move(r), got.back()->Sink()).ok());
  }
  std::vector<std::vector<int32_t>> out;
  for (auto& c : got) {
    EXPECT_TRUE(c->Wait()) << "no final event";
    EXPECT_TRUE(c->status.ok()) << c->status;
    out.push_back(c->tokens);
  }
  EXPECT_TRUE((*e)->Stats().healthy);
  return out;
}

TEST(CudaGraphs, EngineTokensAreTheSameWithGraphsOnAndOff) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<std::vector<int32_t>> prompts = {RandomTokens(150, 256, 1), RandomTokens(333, 256, 2),
                                                     RandomTokens(60, 256, 3)};
  const auto off = Generate(false, prompts);
  const auto on = Generate(true, prompts);
  RegisterCudaBackend();  // the default again for whatever runs next
  ASSERT_EQ(off.size(), prompts.size());
  ASSERT_EQ(on.size(), prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(on[i].size(), 30u + 7 * i);
    EXPECT_EQ(on[i], off[i]) << "request " << i;
  }
}

// ---- Timing (printed, not asserted) ----------------------------------------------------------------

// Median wall time of a decode step (Run returns after the logits are on the host) for `batch`
// sequences of a `context`-token prompt, over `steps` steps after 5 warm-up steps.
double MedianDecodeMs(const ModelWeights& w, bool graphs, int batch, int64_t context, int steps, int64_t* graph_bytes) {
  const ModelConfig& m = w.config;
  const KvCacheConfig cache = CacheFor(m, context + steps + 8, batch, 0);
  CudaExecutorConfig c;
  c.max_tokens_per_step = 2048;
  c.max_seqs_per_step = 64;
  c.cuda_graphs = graphs;
  auto e = CudaExecutor::Create(w, cache, c);
  EXPECT_TRUE(e.ok()) << e.status();
  if (!e.ok()) return NAN;
  KvCacheManager kv(m, cache);
  StepOutput out;
  for (int s = 0; s < batch; ++s) {
    auto r = kv.Plan(s, context + steps + 8);
    EXPECT_TRUE(r.ok());
    kv.Commit(*r);
    const std::vector<int32_t> prompt = RandomTokens(context, std::min(m.vocab_size, 256), s);
    for (int64_t p = 0; p < context; p += 2048) {
      StepPlan plan;
      const int64_t len = std::min<int64_t>(2048, context - p);
      plan.seqs.push_back({s, p, std::vector<int32_t>(prompt.begin() + p, prompt.begin() + p + len), &kv.Pages(s), false});
      EXPECT_TRUE((*e)->Run(plan, &out).ok());
    }
  }
  size_t free_before = 0, free_after = 0, total = 0;
  cudaMemGetInfo(&free_before, &total);
  std::vector<double> ms;
  for (int i = 0; i < steps + 5; ++i) {
    StepPlan plan;
    for (int s = 0; s < batch; ++s) plan.seqs.push_back({s, context + i, {static_cast<int32_t>(i % 200)}, &kv.Pages(s), false});
    const auto t0 = std::chrono::steady_clock::now();
    const absl::Status st = (*e)->Run(plan, &out);
    const auto t1 = std::chrono::steady_clock::now();
    EXPECT_TRUE(st.ok()) << st;
    if (i >= 5) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  cudaMemGetInfo(&free_after, &total);
  *graph_bytes = static_cast<int64_t>(free_before) - static_cast<int64_t>(free_after);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

TEST(CudaGraphs, DecodeStepTimes) {
  NEEDLE_SKIP_WITHOUT_GPU();
  for (const char* preset : {"demo", "tiny-nsa"}) {
    auto w = MakePresetWeights(preset, 1);
    ASSERT_TRUE(w.ok());
    for (int batch : {1, 8}) {
      int64_t bytes_off = 0, bytes_on = 0;
      const double off = MedianDecodeMs(*w, false, batch, 2000, 100, &bytes_off);
      const double on = MedianDecodeMs(*w, true, batch, 2000, 100, &bytes_on);
      std::printf("  %s, batch %d, context 2000: decode step median %.3f ms eager, %.3f ms graphs (%.2fx); device "
                  "memory taken while capturing: %lld bytes\n",
                  preset, batch, off, on, off / on, static_cast<long long>(bytes_on));
    }
  }
}

}  // namespace
}  // namespace needle::engine::cuda
