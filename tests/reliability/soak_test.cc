// A bounded soak of a real needle-server (label soak; docs/reliability.md, "Load"). Concurrent clients
// send a fixed number of requests with random prompt lengths and parameters; some are cancelled by
// the client, some run into their deadline, some are aborted through the Abort RPC, some are invalid.
// The run stops by itself: after the last request, or at the time limit (no new requests are sent
// after it). Afterwards:
//   - every request ended with a finish reason (OK streams: Finished last, reason STOP, LENGTH or
//     EOS, the streamed ids adding up to usage.completion_tokens, all max_tokens for LENGTH) or with
//     the status its kind allows;
//   - the server is idle and every KV pool is back at its baseline (GetStats), nothing failed;
//   - the server's resident memory (VmRSS) after the run exceeds its value after a warm-up phase of
//     the same traffic by at most kRssGrowthBoundKib.
// NEEDLE_SOAK_REQUESTS and NEEDLE_SOAK_SECONDS override the request count and the time limit.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/reliability/harness.h"

namespace needle::reliability {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kClients = 8;
constexpr int kDefaultRequests = 640;
constexpr int kDefaultSeconds = 200;
constexpr int kWarmupRequests = 48;  // same traffic, before the memory baseline is taken
// Resident memory may grow this much between the warm-up baseline and the end of the run: allocator
// caches and gRPC's per-connection buffers settle during the warm-up; a per-request leak (a stream,
// an engine request, a page table) of even 100 KiB would exceed it within the run.
constexpr int64_t kRssGrowthBoundKib = 24 * 1024;

enum class Kind { kNormal, kClientCancel, kDeadline, kAbort, kInvalid };

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kNormal:
      return "normal";
    case Kind::kClientCancel:
      return "client-cancel";
    case Kind::kDeadline:
      return "deadline";
    case Kind::kAbort:
      return "abort";
    case Kind::kInvalid:
      return "invalid";
  }
  return "?";
}

struct Plan {
  Kind kind = Kind::kNormal;
  v1::GenerateRequest request;
  int cancel_after_messages = 0;               // kClientCancel, kAbort: cancel after this many + 1
  std::chrono::milliseconds timeout{120'000};  // kDeadline: short
  grpc::StatusCode invalid_code = grpc::StatusCode::OK;
};

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && std::atoi(v) > 0 ? std::atoi(v) : fallback;
}

// Request `i` of the run, reproducible from its index.
Plan MakePlan(int i) {
  std::mt19937_64 rng(0x50a4ull * 7919 + static_cast<uint64_t>(i));
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  Plan p;
  const int r = uniform(0, 99);
  p.kind = r < 56   ? Kind::kNormal
           : r < 70 ? Kind::kClientCancel
           : r < 84 ? Kind::kDeadline
           : r < 92 ? Kind::kAbort
                    : Kind::kInvalid;
  // Prompt lengths: mostly short, some long enough to take several prefill chunks.
  const int bucket = uniform(0, 99);
  const int prompt_len = bucket < 70 ? uniform(1, 256) : bucket < 95 ? uniform(257, 1024) : uniform(1025, 2048);
  const uint32_t max_tokens = static_cast<uint32_t>(uniform(1, 64));
  v1::GenerateRequest& q = p.request;
  q.set_request_id("soak-" + std::to_string(i));
  if (uniform(0, 9) < 8) {
    for (int k = 0; k < prompt_len; ++k) q.mutable_token_ids()->add_ids(static_cast<uint32_t>(uniform(0, 255)));
  } else {
    std::string text;
    for (int k = 0; k < prompt_len; ++k) text += static_cast<char>(uniform(32, 126));
    q.set_text(text);
  }
  q.mutable_stopping()->set_max_tokens(max_tokens);
  q.mutable_stopping()->set_ignore_eos(uniform(0, 1) == 1);
  if (uniform(0, 4) == 0) q.mutable_stopping()->add_stop(std::string(1, static_cast<char>(uniform(97, 122))));
  if (uniform(0, 1) == 0) {
    q.mutable_sampling()->set_temperature(0);
  } else {
    q.mutable_sampling()->set_temperature(0.8f);
    q.mutable_sampling()->set_top_p(0.95f);
    if (uniform(0, 1) == 0) q.mutable_sampling()->set_seed(static_cast<uint64_t>(i));
  }
  if (uniform(0, 5) == 0) {
    q.set_return_logprobs(true);
    q.set_top_logprobs(static_cast<uint32_t>(uniform(0, 5)));
  }
  switch (p.kind) {
    case Kind::kClientCancel:
    case Kind::kAbort:
      p.cancel_after_messages = uniform(0, 4);
      q.mutable_stopping()->set_max_tokens(max_tokens + 200);  // long enough to be cut
      break;
    case Kind::kDeadline:
      p.timeout = std::chrono::milliseconds(uniform(20, 1500));
      break;
    case Kind::kInvalid:
      switch (uniform(0, 3)) {
        case 0:
          q.mutable_sampling()->set_top_p(1.5f);
          p.invalid_code = grpc::StatusCode::INVALID_ARGUMENT;
          break;
        case 1:
          q.mutable_stopping()->set_max_tokens(kDemoContext);
          p.invalid_code = grpc::StatusCode::OUT_OF_RANGE;
          break;
        case 2:
          q.clear_input();
          p.invalid_code = grpc::StatusCode::INVALID_ARGUMENT;
          break;
        default:
          q.mutable_sampling()->set_repetition_penalty(-1);
          p.invalid_code = grpc::StatusCode::INVALID_ARGUMENT;
          break;
      }
      break;
    case Kind::kNormal:
      break;
  }
  return p;
}

struct Outcome {
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string problem;  // empty when the outcome is one the plan allows
};

// Checks an OK stream: Finished last, a normal reason, ids adding up, all max_tokens for LENGTH.
std::string CheckCompleted(const StreamResult& r, const v1::GenerateRequest& q) {
  if (!r.finished) return "OK without a Finished event";
  if (!r.finished_last) return "messages after Finished";
  const v1::FinishReason reason = r.finished->reason();
  if (reason != v1::FINISH_REASON_STOP && reason != v1::FINISH_REASON_LENGTH && reason != v1::FINISH_REASON_EOS) {
    return "OK with finish reason " + v1::FinishReason_Name(reason);
  }
  if (r.ids.size() != r.finished->usage().completion_tokens()) {
    return "streamed " + std::to_string(r.ids.size()) + " ids, usage says " +
           std::to_string(r.finished->usage().completion_tokens());
  }
  if (reason == v1::FINISH_REASON_LENGTH && r.ids.size() != q.stopping().max_tokens()) {
    return "LENGTH after " + std::to_string(r.ids.size()) + " of " + std::to_string(q.stopping().max_tokens()) +
           " tokens (silently truncated)";
  }
  if (reason != v1::FINISH_REASON_LENGTH && r.ids.size() > q.stopping().max_tokens()) {
    return "more tokens than max_tokens";
  }
  return "";
}

Outcome RunOne(v1::Generation::Stub& stub, const Plan& p) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + p.timeout);
  int messages = 0;
  bool aborted = false;
  StreamResult r = Generate(stub, p.request, &ctx, [&](const v1::GenerateResponse&, grpc::ClientContext& c) {
    if (++messages <= p.cancel_after_messages || aborted) return;
    if (p.kind == Kind::kClientCancel) {
      c.TryCancel();
      aborted = true;
    } else if (p.kind == Kind::kAbort) {
      grpc::ClientContext actx;
      actx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      v1::AbortRequest a;
      a.set_request_id(p.request.request_id());
      v1::AbortResponse resp;
      stub.Abort(&actx, a, &resp);
      aborted = true;
    }
  });
  Outcome o;
  o.code = r.status.error_code();
  auto allow = [&](std::initializer_list<grpc::StatusCode> codes) {
    if (std::find(codes.begin(), codes.end(), o.code) == codes.end()) {
      o.problem = std::string(KindName(p.kind)) + " request ended with " + Describe(r.status);
    }
  };
  switch (p.kind) {
    case Kind::kNormal:
      allow({grpc::StatusCode::OK});
      break;
    case Kind::kClientCancel:
      allow({grpc::StatusCode::OK, grpc::StatusCode::CANCELLED});
      break;
    case Kind::kDeadline:
      allow({grpc::StatusCode::OK, grpc::StatusCode::DEADLINE_EXCEEDED});
      break;
    case Kind::kAbort:
      allow({grpc::StatusCode::OK, grpc::StatusCode::CANCELLED});
      break;
    case Kind::kInvalid:
      allow({p.invalid_code});
      break;
  }
  if (o.problem.empty() && o.code == grpc::StatusCode::OK) o.problem = CheckCompleted(r, p.request);
  if (o.problem.empty() && o.code == grpc::StatusCode::CANCELLED && p.kind == Kind::kAbort) {
    // Abort ends the stream with Finished(CANCELLED) after what was already generated.
    if (!r.finished || r.finished->reason() != v1::FINISH_REASON_CANCELLED) o.problem = "Abort without Finished";
  }
  return o;
}

// Runs plans [first, last) on kClients threads until done or `stop_at`; returns how many ran.
int RunPhase(const std::vector<std::shared_ptr<grpc::Channel>>& channels, int first, int last,
             Clock::time_point stop_at, std::vector<Outcome>* outcomes) {
  std::atomic<int> next{first};
  std::atomic<int> ran{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      auto stub = v1::Generation::NewStub(channels[c]);
      for (;;) {
        const int i = next++;
        if (i >= last || Clock::now() >= stop_at) return;
        (*outcomes)[i] = RunOne(*stub, MakePlan(i));
        ++ran;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  return ran;
}

TEST(Soak, ConcurrentClientsCancellationsAndDeadlinesLeaveNoTrace) {
  const int requests = std::max(EnvInt("NEEDLE_SOAK_REQUESTS", kDefaultRequests), kWarmupRequests + 1);
  const auto stop_at = Clock::now() + std::chrono::seconds(EnvInt("NEEDLE_SOAK_SECONDS", kDefaultSeconds));
  Server server;
  ASSERT_NO_FATAL_FAILURE(server.Start({"--max_batch=8", "--prefill_chunk=128", "--max_queue=64", "--log_level=warn"}));
  const pid_t pid = server.process().process().pid();
  // Each client its own connection, as separate processes would have.
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int c = 0; c < kClients; ++c) channels.push_back(server.process().NewChannel());

  // Invariants that must hold at every moment, sampled throughout.
  std::atomic<bool> done{false};
  std::vector<std::string> violations;
  int64_t peak_rss = 0;
  std::thread watcher([&] {
    while (!done) {
      v1::ServerStats s = server.Stats();
      if (s.running() > 8) violations.push_back("running " + std::to_string(s.running()) + " > max_batch");
      for (const v1::CachePool& p : s.pools()) {
        if (p.free_pages() > p.total_pages()) violations.push_back("pool " + p.name() + " has more free than total");
      }
      if (!s.healthy()) violations.push_back("unhealthy");
      peak_rss = std::max(peak_rss, ResidentKib(pid));
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });

  std::vector<Outcome> outcomes(static_cast<size_t>(requests));
  const auto t0 = Clock::now();
  const int warm = RunPhase(channels, 0, kWarmupRequests, stop_at, &outcomes);
  server.ExpectPagesReturn();
  const int64_t rss_warm = ResidentKib(pid);
  const int rest = RunPhase(channels, kWarmupRequests, requests, stop_at, &outcomes);
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  done = true;
  watcher.join();
  server.ExpectPagesReturn(std::chrono::seconds(60));
  const int64_t rss_end = ResidentKib(pid);

  const int ran = warm + rest;
  std::map<grpc::StatusCode, int> by_code;
  int problems = 0;
  for (int i = 0; i < ran; ++i) {
    by_code[outcomes[i].code]++;
    if (!outcomes[i].problem.empty()) {
      ++problems;
      if (problems <= 20) ADD_FAILURE() << "request " << i << ": " << outcomes[i].problem;
    }
  }
  std::string summary;
  for (const auto& [code, n] : by_code) summary += " code" + std::to_string(code) + "=" + std::to_string(n);
  const v1::ServerStats end = server.Stats();
  std::printf(
      "soak: %d of %d requests in %.1f s;%s; engine finished=%llu cancelled=%llu refused=%llu failed=%llu "
      "steps=%llu; VmRSS after warm-up %lld KiB, at the end %lld KiB, peak %lld KiB\n",
      ran, requests, seconds, summary.c_str(), static_cast<unsigned long long>(end.finished()),
      static_cast<unsigned long long>(end.cancelled()), static_cast<unsigned long long>(end.refused()),
      static_cast<unsigned long long>(end.failed()), static_cast<unsigned long long>(end.steps()),
      static_cast<long long>(rss_warm), static_cast<long long>(rss_end), static_cast<long long>(peak_rss));

  EXPECT_EQ(problems, 0);
  for (size_t i = 0; i < std::min<size_t>(violations.size(), 10); ++i) ADD_FAILURE() << violations[i];
  // The time limit is a safety net: on the reference machine (2 cores) the run finishes every request.
  EXPECT_GE(ran, requests / 2) << "the time limit stopped the run early: the server is far slower than expected";
  EXPECT_EQ(warm, kWarmupRequests);
  EXPECT_EQ(end.failed(), 0u);
  EXPECT_TRUE(end.healthy());
  EXPECT_EQ(end.preempted(), 0u);
  // Every OK stream was finished by the engine; nothing else ends a request.
  EXPECT_GE(end.finished() - server.baseline().finished(), static_cast<uint64_t>(by_code[grpc::StatusCode::OK]));
  EXPECT_LE(end.finished() + end.cancelled() + end.refused() -
                (server.baseline().finished() + server.baseline().cancelled() + server.baseline().refused()),
            static_cast<uint64_t>(ran));
  ASSERT_GT(rss_warm, 0);
  EXPECT_LE(rss_end - rss_warm, kRssGrowthBoundKib)
      << "resident memory grew from " << rss_warm << " KiB after the warm-up to " << rss_end << " KiB";
  server.ExpectGoodRequest();
}

}  // namespace
}  // namespace needle::reliability
