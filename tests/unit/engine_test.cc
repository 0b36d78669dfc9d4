// The Engine end to end in-process (no gRPC): greedy tokens against the independent full recompute,
// batching invariance, seeded sampling, stop conditions, validation statuses, cancellation, deadlines
// and the pools returning to their baseline.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "absl/time/clock.h"
#include "engine/builder.h"
#include "engine/presets.h"
#include "tests/support/naive_forward.h"

namespace needle::engine {
namespace {

struct Collected {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<RequestEvent> events;
  bool done = false;

  EventSink Sink() {
    return [this](RequestEvent&& ev) {
      std::lock_guard<std::mutex> lock(mu);
      done = done || ev.kind == RequestEvent::Kind::kFinished;
      events.push_back(std::move(ev));
      cv.notify_all();
    };
  }
  const RequestEvent& Wait() {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(120), [&] { return done; })) << "no final event";
    return events.back();
  }
  // Until `n` token events have arrived.
  void WaitForTokenEvents(int n) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] {
      return std::count_if(events.begin(), events.end(),
                           [](const auto& ev) { return ev.kind == RequestEvent::Kind::kTokens; }) >= n;
    });
  }
  std::vector<int32_t> Tokens() {
    std::lock_guard<std::mutex> lock(mu);
    std::vector<int32_t> t;
    for (const auto& e : events) t.insert(t.end(), e.token_ids.begin(), e.token_ids.end());
    return t;
  }
  std::string Text() {
    std::lock_guard<std::mutex> lock(mu);
    std::string s;
    for (const auto& e : events) s += e.text;
    return s;
  }
};

std::unique_ptr<Engine> Build(const std::string& model, int max_batch = 8, int chunk = 64,
                              int64_t kv_bytes = 64ll << 20, int64_t max_seq = 4096) {
  EngineOptions o;
  o.model = model;
  o.model_seed = 5;
  o.kv_cache_bytes = kv_bytes;
  o.max_seq_tokens = max_seq;
  o.kv_shuffle_seed = 17;
  o.engine.max_batch = max_batch;
  o.engine.prefill_chunk = chunk;
  o.engine.step_token_budget = std::max(256, max_batch);
  o.engine.stats_log_interval_s = 0;
  auto e = BuildEngine(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return std::move(e).value();
}

std::vector<int32_t> Prompt(int n, uint64_t seed) {
  std::vector<int32_t> p(n);
  for (int i = 0; i < n; ++i) p[i] = static_cast<int32_t>((seed * 131 + i * 17 + (i * i) % 7) % 256);
  return p;
}

Request Greedy(std::vector<int32_t> prompt, int max_tokens) {
  Request r;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0;
  r.stopping.max_tokens = max_tokens;
  r.stopping.ignore_eos = true;
  return r;
}

void ExpectPoolsAtBaseline(Engine& e) {
  const absl::Time end = absl::Now() + absl::Seconds(30);
  while (!e.Idle() && absl::Now() < end) absl::SleepFor(absl::Milliseconds(5));
  absl::SleepFor(absl::Milliseconds(20));
  EngineStats s = e.Stats();
  for (const PoolStats& p : s.pools) EXPECT_EQ(p.free, p.total) << p.name;
  EXPECT_EQ(s.running, 0);
  EXPECT_EQ(s.waiting, 0);
}

TEST(Engine, GreedyTokensMatchTheFullRecompute) {
  for (const std::string model : {"tiny-nsa-paper", "tiny-llama-nsa", "tiny-llama"}) {
    auto e = Build(model, 8, 48);
    const std::vector<int32_t> prompt = Prompt(700, 3);
    Collected c;
    ASSERT_TRUE(e->Submit(Greedy(prompt, 24), c.Sink()).ok());
    const RequestEvent& fin = c.Wait();
    EXPECT_EQ(fin.reason, FinishReason::kLength);
    const std::vector<int32_t> got = c.Tokens();
    ASSERT_EQ(got.size(), 24u);
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), got.begin(), got.end());
    auto w = MakePresetWeights(model, 5);
    ASSERT_TRUE(w.ok());
    const auto logits = needle::testing::NaiveForward(*w, all);
    for (size_t i = 0; i < got.size(); ++i) {
      const auto& row = logits[prompt.size() - 1 + i];
      const int32_t want = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
      std::vector<float> sorted(row);
      std::sort(sorted.rbegin(), sorted.rend());
      if (sorted[0] - sorted[1] < 1e-4f) continue;  // a legitimate near-tie
      EXPECT_EQ(got[i], want) << model << ": generated token " << i;
    }
    ExpectPoolsAtBaseline(*e);
  }
}

TEST(Engine, ConcurrentRequestsGetTheTokensTheyGetAlone) {
  auto e = Build("tiny-nsa-paper", 8, 32);
  std::vector<std::vector<int32_t>> alone;
  for (int i = 0; i < 6; ++i) {
    Collected c;
    ASSERT_TRUE(e->Submit(Greedy(Prompt(50 + 90 * i, i), 12), c.Sink()).ok());
    c.Wait();
    alone.push_back(c.Tokens());
  }
  // Seeded sampling too: the same seed gives the same tokens whatever else is batched.
  Request sampled = Greedy(Prompt(120, 99), 12);
  sampled.sampling.temperature = 0.9f;
  sampled.sampling.top_p = 0.9f;
  sampled.sampling.seed = 42;
  Collected sampled_alone;
  ASSERT_TRUE(e->Submit(sampled, sampled_alone.Sink()).ok());
  sampled_alone.Wait();

  std::vector<std::unique_ptr<Collected>> together;
  for (int i = 0; i < 6; ++i) {
    together.push_back(std::make_unique<Collected>());
    ASSERT_TRUE(e->Submit(Greedy(Prompt(50 + 90 * i, i), 12), together.back()->Sink()).ok());
  }
  Collected sampled_together;
  ASSERT_TRUE(e->Submit(sampled, sampled_together.Sink()).ok());
  for (int i = 0; i < 6; ++i) {
    together[i]->Wait();
    EXPECT_EQ(together[i]->Tokens(), alone[i]) << "request " << i;
  }
  sampled_together.Wait();
  EXPECT_EQ(sampled_together.Tokens(), sampled_alone.Tokens());
  ExpectPoolsAtBaseline(*e);
}

TEST(Engine, StopStringsStopIdsAndLength) {
  auto e = Build("tiny-nsa-paper");
  Collected base;
  ASSERT_TRUE(e->Submit(Greedy(Prompt(40, 1), 20), base.Sink()).ok());
  base.Wait();
  const std::vector<int32_t> toks = base.Tokens();
  ASSERT_EQ(toks.size(), 20u);
  // Stop on the 5th generated token's id.
  Request by_id = Greedy(Prompt(40, 1), 20);
  by_id.stopping.stop_token_ids = {toks[4]};
  Collected c1;
  ASSERT_TRUE(e->Submit(by_id, c1.Sink()).ok());
  const auto first = std::find(toks.begin(), toks.end(), toks[4]) - toks.begin();
  EXPECT_EQ(c1.Wait().reason, FinishReason::kStop);
  EXPECT_EQ(c1.Tokens(), std::vector<int32_t>(toks.begin(), toks.begin() + first + 1));
  // A stop string spanning two tokens (bytes of tokens 6 and 7): the text ends right before it.
  std::string stop;
  stop.push_back(static_cast<char>(toks[6]));
  stop.push_back(static_cast<char>(toks[7]));
  Request by_str = Greedy(Prompt(40, 1), 20);
  by_str.stopping.stop = {stop};
  Collected c2;
  ASSERT_TRUE(e->Submit(by_str, c2.Sink()).ok());
  const RequestEvent& fin = c2.Wait();
  EXPECT_EQ(fin.reason, FinishReason::kStop);
  EXPECT_EQ(fin.matched_stop, stop);
  EXPECT_EQ(fin.usage.completion_tokens, static_cast<int64_t>(c2.Tokens().size()));
  EXPECT_LE(c2.Tokens().size(), 8u);
  ExpectPoolsAtBaseline(*e);
}

TEST(Engine, InvalidRequestsGetStatusesNamingTheProblem) {
  auto e = Build("tiny-llama");  // context 8192
  Collected c;
  auto code = [&](Request r) { return e->Submit(std::move(r), c.Sink()).status(); };
  EXPECT_EQ(code(Greedy({}, 4)).code(), absl::StatusCode::kInvalidArgument);
  absl::Status s = code(Greedy({1, 2, 99999}, 4));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("token_ids[2]"), std::string::npos) << s;
  Request bad_t = Greedy({1, 2}, 4);
  bad_t.sampling.temperature = -1;
  s = code(bad_t);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("temperature"), std::string::npos) << s;
  s = code(Greedy({1, 2}, 9000));
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
  Request dup = Greedy(Prompt(2000, 1), 200);
  dup.id = "same";
  Collected d;
  ASSERT_TRUE(e->Submit(dup, d.Sink()).ok());
  EXPECT_EQ(e->Submit(dup, c.Sink()).status().code(), absl::StatusCode::kAlreadyExists);
  e->Cancel("same");
  EXPECT_EQ(d.Wait().reason, FinishReason::kCancelled);
  EXPECT_FALSE(e->Cancel("same"));  // idempotent: unknown now
  EXPECT_FALSE(e->Cancel("never-existed"));
  // Still serving.
  Collected ok;
  ASSERT_TRUE(e->Submit(Greedy({1, 2, 3}, 2), ok.Sink()).ok());
  EXPECT_EQ(ok.Wait().reason, FinishReason::kLength);
  EXPECT_GE(e->Stats().refused, 4);
  ExpectPoolsAtBaseline(*e);
}

TEST(Engine, CancelMidPrefillAndMidDecodeAndDeadlinesFreeEveryPage) {
  auto e = Build("tiny-nsa-paper", 8, 16);
  // Mid-prefill: a long prompt in 16-token chunks; cancel after the first progress event.
  Collected pre;
  Request long_prompt = Greedy(Prompt(3000, 4), 50);
  long_prompt.id = "long";
  ASSERT_TRUE(e->Submit(long_prompt, pre.Sink()).ok());
  {
    std::unique_lock<std::mutex> lock(pre.mu);
    pre.cv.wait(lock, [&] { return !pre.events.empty(); });
    EXPECT_EQ(pre.events[0].kind, RequestEvent::Kind::kPrefillProgress);
  }
  e->Cancel("long");
  EXPECT_EQ(pre.Wait().reason, FinishReason::kCancelled);
  EXPECT_TRUE(pre.Tokens().empty());
  // Mid-decode.
  Collected dec;
  Request decode = Greedy(Prompt(30, 5), 4000);
  decode.id = "decode";
  ASSERT_TRUE(e->Submit(decode, dec.Sink()).ok());
  dec.WaitForTokenEvents(3);
  e->Cancel("decode");
  EXPECT_EQ(dec.Wait().reason, FinishReason::kCancelled);
  // Deadline.
  Collected dl;
  Request timed = Greedy(Prompt(30, 6), 4000);
  timed.deadline = absl::Now() + absl::Milliseconds(200);
  ASSERT_TRUE(e->Submit(timed, dl.Sink()).ok());
  const RequestEvent& fin = dl.Wait();
  EXPECT_EQ(fin.reason, FinishReason::kDeadline);
  EXPECT_EQ(fin.status.code(), absl::StatusCode::kDeadlineExceeded);
  ExpectPoolsAtBaseline(*e);
  EngineStats s = e->Stats();
  EXPECT_EQ(s.cancelled, 3);
}

// The monitoring metrics (EngineStats::metrics) against what the requests' own events say: token
// totals, one queue-time, time-to-first-token and request-latency observation per finished request,
// one inter-token gap per token after the first (their sum telescopes to last - first token time of
// each request), and for a request cancelled mid-decode its tokens and gaps but no request latency.
TEST(Engine, MetricsCountTokensAndLatencies) {
  auto e = Build("tiny-nsa", 8, 16);
  Collected a, b;
  ASSERT_TRUE(e->Submit(Greedy(Prompt(40, 1), 5), a.Sink()).ok());
  ASSERT_TRUE(e->Submit(Greedy(Prompt(70, 2), 9), b.Sink()).ok());
  const double first_a = a.Wait().timings.first_token_s, first_b = b.Wait().timings.first_token_s;
  ExpectPoolsAtBaseline(*e);
  auto token_times = [](Collected& c) {
    std::lock_guard<std::mutex> lock(c.mu);
    std::vector<double> t;
    for (const auto& ev : c.events) t.insert(t.end(), ev.token_times_s.begin(), ev.token_times_s.end());
    return t;
  };
  const std::vector<double> ta = token_times(a), tb = token_times(b);
  ASSERT_EQ(ta.size(), 5u);
  ASSERT_EQ(tb.size(), 9u);
  EngineMetrics m = e->Stats().metrics;
  EXPECT_EQ(m.prompt_tokens, 40 + 70);
  EXPECT_EQ(m.generation_tokens, 5 + 9);
  EXPECT_EQ(m.queue_time.count, 2);
  EXPECT_EQ(m.time_to_first_token.count, 2);
  EXPECT_NEAR(m.time_to_first_token.sum, first_a + first_b, 1e-6);
  EXPECT_EQ(m.inter_token_latency.count, 4 + 8);
  EXPECT_NEAR(m.inter_token_latency.sum, (ta.back() - ta.front()) + (tb.back() - tb.front()), 1e-6);
  EXPECT_EQ(m.request_latency.count, 2);
  EXPECT_GE(m.request_latency.sum, ta.back() + tb.back() - 1e-6);
  for (const LatencyHistogram* h : {&m.queue_time, &m.time_to_first_token, &m.inter_token_latency, &m.request_latency}) {
    int64_t n = 0;
    for (int64_t c : h->buckets) n += c;
    EXPECT_EQ(n, h->count);
  }

  Collected c;
  Request decode = Greedy(Prompt(30, 3), 4000);
  decode.id = "cancelled";
  ASSERT_TRUE(e->Submit(decode, c.Sink()).ok());
  c.WaitForTokenEvents(3);
  e->Cancel("cancelled");
  EXPECT_EQ(c.Wait().reason, FinishReason::kCancelled);
  ExpectPoolsAtBaseline(*e);
  const int64_t generated = static_cast<int64_t>(c.Tokens().size());
  m = e->Stats().metrics;
  EXPECT_EQ(m.prompt_tokens, 40 + 70 + 30);
  EXPECT_EQ(m.generation_tokens, 5 + 9 + generated);
  EXPECT_EQ(m.time_to_first_token.count, 3);
  EXPECT_EQ(m.inter_token_latency.count, 4 + 8 + generated - 1);
  EXPECT_EQ(m.request_latency.count, 2);  // cancelled: not a finished request
}

TEST(Engine, DrainRefusesNewRequestsAndFinishesLiveOnes) {
  auto e = Build("tiny-llama");
  Collected live;
  ASSERT_TRUE(e->Submit(Greedy(Prompt(20, 1), 30), live.Sink()).ok());
  e->Drain();
  Collected late;
  EXPECT_EQ(e->Submit(Greedy(Prompt(20, 2), 3), late.Sink()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(live.Wait().reason, FinishReason::kLength);
  EXPECT_EQ(live.Tokens().size(), 30u);
}

TEST(Engine, RequestLargerThanTheWholeCacheIsRefused) {
  // One 256-token tiny-llama sequence: 2 layers x 2 KV heads x (16 + 16) x 4 bytes x 256 tokens.
  auto e = Build("tiny-llama", 8, 64, /*kv_bytes=*/2 * 2 * 32 * 4 * 256, /*max_seq=*/256);
  Collected c;
  absl::Status s = e->Submit(Greedy(Prompt(300, 1), 100), c.Sink()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  ASSERT_TRUE(e->Submit(Greedy(Prompt(100, 1), 100), c.Sink()).ok());
  EXPECT_EQ(c.Wait().reason, FinishReason::kLength);
}

// A budget that cannot hold one sequence of max_seq_tokens is refused at build time with the bytes
// it would take, instead of silently allocating more than the budget.
TEST(Engine, BudgetBelowOneSequenceIsRefused) {
  EngineOptions o;
  o.model = "tiny-llama";
  o.max_seq_tokens = 256;
  o.kv_cache_bytes = 2 * 2 * 32 * 4 * 256 - 1;  // one byte short of one 256-token sequence
  auto e = BuildEngine(o);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(e.status().message().find("131072 bytes"), absl::string_view::npos) << e.status();
  EXPECT_NE(e.status().message().find("--kv_cache_bytes"), absl::string_view::npos) << e.status();
  o.kv_cache_bytes += 1;
  EXPECT_TRUE(BuildEngine(o).ok());
}

}  // namespace
}  // namespace needle::engine
