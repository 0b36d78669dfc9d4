// End-to-end tests of needle-server: a real server process on 127.0.0.1:0 (demo model, CPU), real
// gRPC clients (the generated C++ stub, the needle-client binary, the Python example). Streaming
// order, batch invariance, reproducible seeded sampling, cancellation (mid-prefill, mid-decode,
// client killed), deadlines, bad input, health, reflection, the Prometheus metrics endpoint and
// SIGTERM draining; after every request that ends early the KV pools must return to their baseline.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "google/protobuf/descriptor.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection_subset.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "needle/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/e2e/raw_generate.h"
#include "tests/e2e/subprocess.h"

namespace needle::e2e {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

// The demo preset: byte vocabulary (259 ids), 16384 positions.
constexpr uint32_t kVocab = 259;
constexpr uint32_t kContext = 16384;

// N ids cycling over the printable bytes, shifted by `offset` (the same rule as needle-client's
// --prompt-tokens when offset is 0).
std::vector<uint32_t> SyntheticPrompt(int n, int offset = 0) {
  std::vector<uint32_t> ids;
  for (int i = 0; i < n; ++i) ids.push_back(static_cast<uint32_t>(32 + (i + offset) % 95));
  return ids;
}

v1::GenerateRequest TokenRequest(const std::vector<uint32_t>& prompt, uint32_t max_tokens) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
  r.mutable_stopping()->set_max_tokens(max_tokens);
  r.mutable_stopping()->set_ignore_eos(true);
  r.mutable_sampling()->set_temperature(0);
  return r;
}

struct StreamResult {
  grpc::Status status;
  std::string request_id;
  std::vector<uint32_t> ids;
  std::vector<double> token_times;
  std::string text;
  int chunks = 0;
  int progress_events = 0;
  bool finished_last = true;  // nothing arrived after Finished
  std::optional<v1::Finished> finished;
};

std::string Describe(const grpc::Status& s) {
  return "status " + std::to_string(s.error_code()) + " \"" + s.error_message() + "\"";
}

// Runs a Generate call to the end. `on_event` may cancel the context (return false to stop reading
// early is not offered: cancellation is the client's tool, as in real use).
StreamResult Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request,
                      std::optional<std::chrono::milliseconds> timeout = std::nullopt,
                      const std::function<void(const v1::GenerateResponse&, grpc::ClientContext&)>& on_event = {}) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + (timeout ? *timeout : std::chrono::milliseconds(60'000)));
  StreamResult out;
  auto reader = stub.Generate(&ctx, request);
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    if (out.finished) out.finished_last = false;
    out.request_id = m.request_id();
    if (m.has_tokens()) {
      ++out.chunks;
      out.ids.insert(out.ids.end(), m.tokens().token_ids().begin(), m.tokens().token_ids().end());
      out.token_times.insert(out.token_times.end(), m.tokens().token_times_s().begin(),
                             m.tokens().token_times_s().end());
      out.text += m.tokens().text();
    } else if (m.has_progress()) {
      ++out.progress_events;
    } else if (m.has_finished()) {
      out.finished = m.finished();
    }
    if (on_event) on_event(m, ctx);
  }
  out.status = reader->Finish();
  return out;
}

class ServerE2eTest : public ::testing::Test {
 protected:
  // --prefill_chunk 64 makes a few-thousand-token prompt take many engine steps (mid-prefill tests).
  static std::vector<std::string> DefaultArgs() { return {"--prefill_chunk=64", "--max_batch=16"}; }

  void StartServer(const std::vector<std::string>& args) {
    std::string error;
    server_ = ServerProcess::Start(args, &error);
    ASSERT_NE(server_, nullptr) << error;
    stub_ = v1::Generation::NewStub(server_->channel());
    // The warm-up request has finished, but the engine publishes stats at the end of its step:
    // wait for an idle snapshot with every page free.
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    for (;;) {
      baseline_ = Stats();
      bool idle = baseline_.running() == 0 && baseline_.waiting() == 0 && baseline_.pools_size() > 0;
      for (const v1::CachePool& p : baseline_.pools()) idle = idle && p.free_pages() == p.total_pages();
      if (idle) break;
      ASSERT_LT(Clock::now(), deadline) << "not idle after warm-up: " << baseline_.ShortDebugString();
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  v1::ServerStats Stats() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::ServerStats stats;
    grpc::Status s = stub_->GetStats(&ctx, v1::GetStatsRequest(), &stats);
    EXPECT_TRUE(s.ok()) << Describe(s);
    return stats;
  }

  // Polls GetStats until nothing runs or waits and every pool has its baseline free pages.
  void ExpectPagesReturn(std::chrono::milliseconds timeout = std::chrono::milliseconds(10'000)) {
    const auto deadline = Clock::now() + timeout;
    v1::ServerStats s;
    for (;;) {
      s = Stats();
      bool back = s.running() == 0 && s.waiting() == 0 && s.pools_size() == baseline_.pools_size();
      for (int i = 0; back && i < s.pools_size(); ++i) back = s.pools(i).free_pages() == baseline_.pools(i).free_pages();
      if (back) return;
      if (Clock::now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ADD_FAILURE() << "KV pages did not return to baseline within " << timeout.count()
                  << " ms: " << s.ShortDebugString() << " (baseline " << baseline_.ShortDebugString() << ")";
  }

  // Waits until the engine has counted `count` cancelled (or deadline-ended) requests. Stats are
  // published at step boundaries, so an event can reach the client before the step that produced it
  // is visible in GetStats: pages are only compared after the request is known to have ended.
  void WaitForCancelled(uint64_t count) {
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    while (Stats().cancelled() < count && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    EXPECT_EQ(Stats().cancelled(), count);
  }

  // A request the server must serve correctly; run after bad input to show it still does.
  void ExpectGoodRequest() {
    StreamResult r = Generate(*stub_, TokenRequest(SyntheticPrompt(32), 4));
    EXPECT_TRUE(r.status.ok()) << Describe(r.status);
    EXPECT_EQ(r.ids.size(), 4u);
  }

  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<v1::Generation::Stub> stub_;
  v1::ServerStats baseline_;
};

TEST_F(ServerE2eTest, StreamsTokensInOrderAndMatchesUsage) {
  StartServer(DefaultArgs());
  v1::GenerateRequest req = TokenRequest(SyntheticPrompt(300), 24);
  req.set_request_id("order-1");
  StreamResult r = Generate(*stub_, req);
  ASSERT_TRUE(r.status.ok()) << Describe(r.status);
  ASSERT_TRUE(r.finished.has_value());
  EXPECT_TRUE(r.finished_last);
  EXPECT_EQ(r.request_id, "order-1");
  EXPECT_EQ(r.finished->reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.finished->usage().prompt_tokens(), 300u);
  EXPECT_EQ(r.finished->usage().completion_tokens(), 24u);
  EXPECT_EQ(r.ids.size(), r.finished->usage().completion_tokens());
  ASSERT_EQ(r.token_times.size(), r.ids.size());
  for (size_t i = 1; i < r.token_times.size(); ++i) EXPECT_LE(r.token_times[i - 1], r.token_times[i]) << i;
  // Finished repeats every token's server time.
  ASSERT_EQ(r.finished->timings().token_times_s_size(), static_cast<int>(r.ids.size()));
  for (size_t i = 0; i < r.ids.size(); ++i) EXPECT_EQ(r.finished->timings().token_times_s(i), r.token_times[i]);
  EXPECT_GT(r.finished->timings().first_token_s(), 0);
  EXPECT_GE(r.finished->timings().first_token_s(), r.finished->timings().queue_s());
  for (uint32_t id : r.ids) EXPECT_LT(id, kVocab);
  // 300 prompt tokens at 64 per step: progress after each chunk but the last.
  EXPECT_EQ(r.progress_events, 4);
  ExpectPagesReturn();

  // The same request again (greedy) gives the same tokens; an empty request_id gets one assigned.
  req.clear_request_id();
  StreamResult again = Generate(*stub_, req);
  ASSERT_TRUE(again.status.ok()) << Describe(again.status);
  EXPECT_EQ(again.ids, r.ids);
  EXPECT_FALSE(again.request_id.empty());
}

// Sample name{labels} -> value of a Prometheus exposition text (comment lines skipped).
std::map<std::string, double> ParseMetrics(const std::string& text) {
  std::map<std::string, double> v;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    if (space == std::string::npos) {
      ADD_FAILURE() << "not a sample: " << line;
      continue;
    }
    v[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return v;
}

// --metrics_listen: GET /metrics answers in the exposition format while serving, agrees with
// GetStats, and one request moves the counters and histograms by what its stream reported.
TEST_F(ServerE2eTest, MetricsEndpointCountsARequest) {
  StartServer({"--prefill_chunk=64", "--metrics_listen=127.0.0.1:0"});
  ASSERT_FALSE(server_->metrics_address().empty());
  auto scrape = [&] {
    int status = 0;
    const std::string body = HttpGet(server_->metrics_address(), "/metrics", &status);
    EXPECT_EQ(status, 200) << body;
    return ParseMetrics(body);
  };
  const std::map<std::string, double> before = scrape();
  EXPECT_EQ(before.at("needle_engine_loaded"), 1);
  EXPECT_EQ(before.at("needle_healthy"), 1);
  EXPECT_EQ(before.at(R"(needle_requests_total{outcome="finished"})"), static_cast<double>(baseline_.finished()));

  StreamResult r = Generate(*stub_, TokenRequest(SyntheticPrompt(300), 24));
  ASSERT_TRUE(r.status.ok()) << Describe(r.status);
  ASSERT_TRUE(r.finished.has_value());
  ExpectPagesReturn();
  const std::map<std::string, double> after = scrape();
  auto delta = [&](const std::string& name) { return after.at(name) - before.at(name); };
  EXPECT_EQ(delta(R"(needle_requests_total{outcome="finished"})"), 1);
  EXPECT_EQ(delta(R"(needle_requests_total{outcome="cancelled"})"), 0);
  EXPECT_EQ(delta("needle_prompt_tokens_total"), 300);
  EXPECT_EQ(delta("needle_generation_tokens_total"), 24);
  EXPECT_EQ(delta("needle_queue_time_seconds_count"), 1);
  EXPECT_EQ(delta("needle_time_to_first_token_seconds_count"), 1);
  EXPECT_NEAR(delta("needle_time_to_first_token_seconds_sum"), r.finished->timings().first_token_s(), 1e-5);
  EXPECT_EQ(delta("needle_inter_token_latency_seconds_count"), 23);
  EXPECT_NEAR(delta("needle_inter_token_latency_seconds_sum"), r.token_times.back() - r.token_times.front(), 1e-5);
  EXPECT_EQ(delta("needle_request_latency_seconds_count"), 1);
  EXPECT_EQ(delta(R"(needle_request_latency_seconds_bucket{le="+Inf"})"), 1);
  EXPECT_EQ(after.at("needle_requests_running"), 0);
  // Every page back, pool by pool, as GetStats says.
  const v1::ServerStats stats = Stats();
  for (const v1::CachePool& p : stats.pools()) {
    EXPECT_EQ(after.at("needle_kv_cache_pages{pool=\"" + p.name() + "\",state=\"used\"}"), 0) << p.name();
    EXPECT_EQ(after.at("needle_kv_cache_pages{pool=\"" + p.name() + "\",state=\"free\"}"), p.total_pages());
  }
  EXPECT_EQ(after.at(R"(needle_requests_total{outcome="finished"})"), static_cast<double>(stats.finished()));
  EXPECT_EQ(after.at("needle_engine_steps_total"), static_cast<double>(stats.steps()));

  int status = 0;
  HttpGet(server_->metrics_address(), "/other", &status);
  EXPECT_EQ(status, 404);
}

// A malformed --metrics_listen is refused before anything starts (exit 2), a port that is taken
// stops the start-up with the address named (exit 1).
TEST(ServerE2eFlags, MetricsListenErrorsNameTheProblem) {
  auto run = [](const std::string& flag, std::string* out) {
    std::string error;
    auto p = Subprocess::Spawn({NEEDLE_SERVER_PATH, "--listen=127.0.0.1:0", flag}, &error, /*merge_stderr=*/true);
    if (p == nullptr) {
      *out = error;
      return -1;
    }
    *out = p->ReadAll(std::chrono::seconds(60));
    return p->Wait(std::chrono::seconds(10));
  };
  std::string out;
  EXPECT_EQ(run("--metrics_listen=nonsense", &out), 2) << out;
  EXPECT_THAT(out, HasSubstr("--metrics_listen must be host:port")) << out;

  const int taken = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(taken, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(bind(taken, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(taken, 1), 0);
  ASSERT_EQ(getsockname(taken, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string busy = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  EXPECT_EQ(run("--metrics_listen=" + busy, &out), 1) << out;
  EXPECT_THAT(out, HasSubstr("cannot listen for metrics on " + busy)) << out;
  close(taken);
}

TEST_F(ServerE2eTest, StreamedTokensMatchNeedleGenerate) {
  StartServer(DefaultArgs());
  const std::vector<uint32_t> prompt = SyntheticPrompt(300, 7);
  StreamResult served = Generate(*stub_, TokenRequest(prompt, 24));
  ASSERT_TRUE(served.status.ok()) << Describe(served.status);
  ASSERT_EQ(served.ids.size(), 24u);
  // needle-generate: the offline command on the same engine path, same model, same chunking.
  char path[] = "/tmp/needle-e2e-ids-XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  std::string text;
  for (uint32_t id : prompt) text += std::to_string(id) + ",";
  ASSERT_EQ(write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  close(fd);
  std::string error;
  auto gen = Subprocess::Spawn({NEEDLE_GENERATE_PATH, "--model", "demo", "--prompt-ids", path, "--max-tokens", "24",
                                "--temperature", "0", "--ignore-eos", "--prefill-chunk", "64", "--json"},
                               &error);
  ASSERT_NE(gen, nullptr) << error;
  const std::string out = gen->ReadAll(std::chrono::seconds(60));
  ASSERT_EQ(gen->Wait(std::chrono::seconds(10)), 0) << out;
  unlink(path);
  nlohmann::json j = nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(j.is_discarded()) << out;
  EXPECT_EQ(j["generated"].get<std::vector<uint32_t>>(), served.ids);
  EXPECT_EQ(j["finish_reason"], "length");
}

TEST_F(ServerE2eTest, ModelInfoTokenizeAndTextPrompts) {
  StartServer(DefaultArgs());
  grpc::ClientContext c1;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&c1, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.model(), "demo");
  EXPECT_EQ(info.architecture(), "nsa-paper");
  EXPECT_EQ(info.vocab_size(), kVocab);
  EXPECT_EQ(info.max_context(), kContext);
  EXPECT_TRUE(info.has_nsa());
  EXPECT_EQ(info.eos_token_id(), 257u);

  grpc::ClientContext c2;
  v1::TokenizeRequest treq;
  treq.set_text("Hello, needle \xE2\x9C\x93");
  v1::TokenizeResponse tresp;
  ASSERT_TRUE(stub_->Tokenize(&c2, treq, &tresp).ok());
  ASSERT_FALSE(tresp.token_ids().empty());

  // A text prompt generates exactly what its token ids generate.
  v1::GenerateRequest by_text = TokenRequest({}, 8);
  by_text.set_text(treq.text());
  StreamResult a = Generate(*stub_, by_text);
  v1::GenerateRequest by_ids =
      TokenRequest(std::vector<uint32_t>(tresp.token_ids().begin(), tresp.token_ids().end()), 8);
  StreamResult b = Generate(*stub_, by_ids);
  ASSERT_TRUE(a.status.ok()) << Describe(a.status);
  ASSERT_TRUE(b.status.ok()) << Describe(b.status);
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(a.finished->usage().prompt_tokens(), static_cast<uint64_t>(tresp.token_ids_size()));
}

TEST_F(ServerE2eTest, ConcurrentGreedyRequestsGetTheirSoloTokens) {
  StartServer(DefaultArgs());
  constexpr int kRequests = 8;
  std::vector<v1::GenerateRequest> reqs;
  for (int i = 0; i < kRequests; ++i) reqs.push_back(TokenRequest(SyntheticPrompt(100 + 37 * i, 11 * i), 16));
  std::vector<std::vector<uint32_t>> solo(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    StreamResult r = Generate(*stub_, reqs[i]);
    ASSERT_TRUE(r.status.ok()) << i << ": " << Describe(r.status);
    ASSERT_EQ(r.ids.size(), 16u);
    solo[i] = r.ids;
  }
  std::vector<StreamResult> together(kRequests);
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] { together[i] = Generate(*stub_, reqs[i]); });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(together[i].status.ok()) << i << ": " << Describe(together[i].status);
    EXPECT_EQ(together[i].ids, solo[i]) << "request " << i << " differs when batched";
  }
  ExpectPagesReturn();
}

TEST_F(ServerE2eTest, SeededSamplingIsReproducibleUnderConcurrency) {
  StartServer(DefaultArgs());
  v1::GenerateRequest seeded = TokenRequest(SyntheticPrompt(120), 24);
  seeded.mutable_sampling()->set_temperature(1.0f);
  seeded.mutable_sampling()->set_top_p(0.95f);
  seeded.mutable_sampling()->set_seed(1234);
  StreamResult alone = Generate(*stub_, seeded);
  ASSERT_TRUE(alone.status.ok()) << Describe(alone.status);
  ASSERT_EQ(alone.ids.size(), 24u);

  // The same request among unseeded sampled neighbours, twice.
  for (int round = 0; round < 2; ++round) {
    std::vector<StreamResult> others(5);
    StreamResult mine;
    std::vector<std::thread> threads;
    for (int i = 0; i < 5; ++i) {
      threads.emplace_back([&, i] {
        v1::GenerateRequest other = TokenRequest(SyntheticPrompt(80 + 20 * i, 3 + i), 24);
        other.mutable_sampling()->set_temperature(1.0f);
        others[i] = Generate(*stub_, other);
      });
    }
    threads.emplace_back([&] { mine = Generate(*stub_, seeded); });
    for (std::thread& t : threads) t.join();
    ASSERT_TRUE(mine.status.ok()) << Describe(mine.status);
    EXPECT_EQ(mine.ids, alone.ids) << "round " << round;
    for (const StreamResult& o : others) EXPECT_TRUE(o.status.ok()) << Describe(o.status);
  }
  // A different seed gives (almost surely) a different sample: the seed is actually used.
  seeded.mutable_sampling()->set_seed(4321);
  StreamResult other_seed = Generate(*stub_, seeded);
  ASSERT_TRUE(other_seed.status.ok());
  EXPECT_NE(other_seed.ids, alone.ids);
}

TEST_F(ServerE2eTest, CancelMidPrefillFreesPages) {
  StartServer(DefaultArgs());
  const uint64_t cancelled_before = baseline_.cancelled();
  StreamResult r = Generate(*stub_, TokenRequest(SyntheticPrompt(4000), 16), std::nullopt,
                            [](const v1::GenerateResponse& m, grpc::ClientContext& ctx) {
                              if (m.has_progress()) ctx.TryCancel();
                            });
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED) << Describe(r.status);
  EXPECT_GE(r.progress_events, 1);
  EXPECT_TRUE(r.ids.empty()) << "cancelled during the prefill, yet tokens arrived";
  WaitForCancelled(cancelled_before + 1);
  ExpectPagesReturn();
  ExpectGoodRequest();
}

TEST_F(ServerE2eTest, CancelMidDecodeFreesPages) {
  StartServer(DefaultArgs());
  StreamResult r = Generate(*stub_, TokenRequest(SyntheticPrompt(200), 8000), std::nullopt,
                            [](const v1::GenerateResponse& m, grpc::ClientContext& ctx) {
                              if (m.has_tokens()) ctx.TryCancel();
                            });
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED) << Describe(r.status);
  EXPECT_FALSE(r.ids.empty());
  EXPECT_LT(r.ids.size(), 8000u);
  WaitForCancelled(baseline_.cancelled() + 1);
  ExpectPagesReturn();
  ExpectGoodRequest();
}

TEST_F(ServerE2eTest, KilledClientMidDecodeFreesPages) {
  StartServer(DefaultArgs());
  std::string error;
  auto client = Subprocess::Spawn({NEEDLE_CLIENT_PATH, "--server", server_->address(), "--prompt-tokens", "200",
                                   "--max-tokens", "12000", "--ignore-eos", "--temperature", "0"},
                                  &error);
  ASSERT_NE(client, nullptr) << error;
  // Wait until the request is admitted and decoding, then kill the client: its connection drops
  // without any cancellation message.
  const auto deadline = Clock::now() + std::chrono::seconds(15);
  while (Stats().running() == 0 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(Stats().running(), 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  client->Signal(SIGKILL);
  EXPECT_EQ(client->Wait(std::chrono::seconds(5)), 128 + SIGKILL);
  WaitForCancelled(baseline_.cancelled() + 1);
  ExpectPagesReturn();
  ExpectGoodRequest();
}

TEST_F(ServerE2eTest, DeadlineEndsTheRequestAndFreesPages) {
  StartServer(DefaultArgs());
  const uint64_t cancelled_before = baseline_.cancelled();
  StreamResult r = Generate(*stub_, TokenRequest(SyntheticPrompt(200), 12000), std::chrono::milliseconds(400));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << Describe(r.status);
  EXPECT_LT(r.ids.size(), 12000u);
  WaitForCancelled(cancelled_before + 1);
  ExpectPagesReturn();
  ExpectGoodRequest();
}

TEST_F(ServerE2eTest, BadInputGetsItsStatusAndTheServerKeepsServing) {
  StartServer(DefaultArgs());
  struct Case {
    const char* name;
    std::function<void(v1::GenerateRequest&)> edit;
    grpc::StatusCode code;
    const char* field;  // expected in the message
  };
  const std::vector<Case> cases = {
      {"no input", [](v1::GenerateRequest& r) { r.clear_input(); }, grpc::StatusCode::INVALID_ARGUMENT, "input"},
      {"empty text", [](v1::GenerateRequest& r) { r.set_text(""); }, grpc::StatusCode::INVALID_ARGUMENT,
       "input.text"},
      {"empty ids", [](v1::GenerateRequest& r) { r.mutable_token_ids()->clear_ids(); },
       grpc::StatusCode::INVALID_ARGUMENT, "input.token_ids"},
      {"id == vocab", [](v1::GenerateRequest& r) { r.mutable_token_ids()->add_ids(kVocab); },
       grpc::StatusCode::INVALID_ARGUMENT, "input.token_ids"},
      {"id 2^32-1", [](v1::GenerateRequest& r) { r.mutable_token_ids()->add_ids(0xffffffffu); },
       grpc::StatusCode::INVALID_ARGUMENT, "input.token_ids"},
      {"NaN temperature",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_temperature(std::numeric_limits<float>::quiet_NaN()); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.temperature"},
      {"negative temperature", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_temperature(-0.5f); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.temperature"},
      {"+inf temperature",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_temperature(std::numeric_limits<float>::infinity()); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.temperature"},
      {"-inf temperature",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_temperature(-std::numeric_limits<float>::infinity()); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.temperature"},
      {"top_p 0", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(0); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_p"},
      {"top_p above 1", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(1.01f); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_p"},
      {"negative top_p", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(-0.5f); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_p"},
      {"NaN top_p",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(std::numeric_limits<float>::quiet_NaN()); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_p"},
      {"negative min_p", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_min_p(-0.1f); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.min_p"},
      {"min_p above 1", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_min_p(1.5f); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.min_p"},
      {"repetition_penalty 0", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_repetition_penalty(0); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.repetition_penalty"},
      {"repetition_penalty above 10",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_repetition_penalty(10.5f); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.repetition_penalty"},
      {"presence_penalty above 2", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_presence_penalty(2.5f); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.presence_penalty"},
      {"frequency_penalty below -2",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_frequency_penalty(-3); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.frequency_penalty"},
      {"max_tokens 0", [](v1::GenerateRequest& r) { r.mutable_stopping()->set_max_tokens(0); },
       grpc::StatusCode::INVALID_ARGUMENT, "stopping.max_tokens"},
      {"empty stop string", [](v1::GenerateRequest& r) { r.mutable_stopping()->add_stop(""); },
       grpc::StatusCode::INVALID_ARGUMENT, "stopping.stop"},
      {"17 stop strings",
       [](v1::GenerateRequest& r) {
         for (int i = 0; i < 17; ++i) r.mutable_stopping()->add_stop("s" + std::to_string(i));
       },
       grpc::StatusCode::INVALID_ARGUMENT, "stopping.stop"},
      {"257-byte stop string", [](v1::GenerateRequest& r) { r.mutable_stopping()->add_stop(std::string(257, 'x')); },
       grpc::StatusCode::INVALID_ARGUMENT, "stopping.stop[0]"},
      {"65 stop token ids",
       [](v1::GenerateRequest& r) {
         for (int i = 0; i < 65; ++i) r.mutable_stopping()->add_stop_token_ids(static_cast<uint32_t>(i));
       },
       grpc::StatusCode::INVALID_ARGUMENT, "stopping.stop_token_ids"},
      {"stop token id == vocab", [](v1::GenerateRequest& r) { r.mutable_stopping()->add_stop_token_ids(kVocab); },
       grpc::StatusCode::INVALID_ARGUMENT, "stopping.stop_token_ids"},
      {"top_logprobs 21", [](v1::GenerateRequest& r) { r.set_top_logprobs(21); },
       grpc::StatusCode::INVALID_ARGUMENT, "top_logprobs"},
      {"request_id over 128 bytes", [](v1::GenerateRequest& r) { r.set_request_id(std::string(129, 'r')); },
       grpc::StatusCode::INVALID_ARGUMENT, "request_id"},
      {"prompt + max_tokens over the context",
       [](v1::GenerateRequest& r) { r.mutable_stopping()->set_max_tokens(kContext); },
       grpc::StatusCode::OUT_OF_RANGE, "max_tokens"},
      {"max_tokens above the context",
       [](v1::GenerateRequest& r) { r.mutable_stopping()->set_max_tokens(kContext + 1); },
       grpc::StatusCode::OUT_OF_RANGE, "max_tokens"},
      {"max_tokens 2^32-1", [](v1::GenerateRequest& r) { r.mutable_stopping()->set_max_tokens(0xffffffffu); },
       grpc::StatusCode::OUT_OF_RANGE, "max_tokens"},
      {"prompt alone over the context",
       [](v1::GenerateRequest& r) {
         r.mutable_token_ids()->mutable_ids()->Clear();
         for (uint32_t id : SyntheticPrompt(kContext + 1)) r.mutable_token_ids()->add_ids(id);
         r.mutable_stopping()->clear_max_tokens();
       },
       grpc::StatusCode::OUT_OF_RANGE, "context"},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest req = TokenRequest(SyntheticPrompt(64), 8);
    c.edit(req);
    StreamResult r = Generate(*stub_, req);
    EXPECT_EQ(r.status.error_code(), c.code) << c.name << ": " << Describe(r.status);
    EXPECT_THAT(r.status.error_message(), HasSubstr(c.field)) << c.name;
    EXPECT_TRUE(r.ids.empty()) << c.name;
  }

  // Invalid UTF-8 in the `text` string field. The bytes go out raw (field 2, length 3, "a\xff" "b"):
  // a proto3 `string` must be UTF-8, so gRPC's own parser refuses the message before needle's
  // handler runs, and gRPC 1.51's callback API answers any request it cannot parse with
  // UNIMPLEMENTED and an empty message (grpcpp/impl/codegen/server_callback_handlers.h). needle's
  // own INVALID_ARGUMENT "input.text: not valid UTF-8" covers parsers that let it through.
  const std::string invalid_utf8("\x12\x03\x61\xff\x62", 5);
  grpc::Status raw = RawGenerate(server_->channel(), invalid_utf8);
  EXPECT_EQ(raw.error_code(), grpc::StatusCode::UNIMPLEMENTED) << Describe(raw);
  // The same path with valid bytes works, so the failure above is the UTF-8 and nothing else.
  const std::string valid_text("\x12\x03\x61\x62\x63\x2a\x02\x08\x02", 9);  // text "abc", stopping.max_tokens 2
  EXPECT_TRUE(RawGenerate(server_->channel(), valid_text).ok());

  // top_k is a uint32 on the wire, so it cannot be negative there (the engine refuses a negative
  // top_k: request_test); any value at or above the vocabulary, up to 2^32-1, means no limit.
  v1::GenerateRequest huge_top_k = TokenRequest(SyntheticPrompt(64), 8);
  huge_top_k.mutable_sampling()->set_top_k(0xffffffffu);
  StreamResult no_limit = Generate(*stub_, huge_top_k);
  EXPECT_TRUE(no_limit.status.ok()) << Describe(no_limit.status);
  EXPECT_EQ(no_limit.ids.size(), 8u);

  // Tokenize applies the same rule.
  grpc::ClientContext tctx;
  v1::TokenizeResponse tresp;
  v1::TokenizeRequest treq;
  treq.set_text("ok");
  EXPECT_TRUE(stub_->Tokenize(&tctx, treq, &tresp).ok());

  ExpectPagesReturn();
  ExpectGoodRequest();
}

TEST_F(ServerE2eTest, SlowReaderIsCancelledWithResourceExhausted) {
  StartServer({"--max_buffered_tokens=32"});
  // A client that takes little from the wire: small HTTP/2 stream window, no window growth.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 1024);
  auto channel = grpc::CreateCustomChannel(server_->address(), grpc::InsecureChannelCredentials(), args);
  auto stub = v1::Generation::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->Generate(&ctx, TokenRequest(SyntheticPrompt(50), 12000));
  v1::GenerateResponse m;
  ASSERT_TRUE(reader->Read(&m));
  // Stop reading while the engine decodes hundreds of tokens.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  size_t tokens = 0;
  while (reader->Read(&m)) tokens += m.has_tokens() ? m.tokens().token_ids_size() : 0;
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << Describe(s);
  EXPECT_THAT(s.error_message(), HasSubstr("too slowly"));
  EXPECT_LT(tokens, 12000u);
  WaitForCancelled(baseline_.cancelled() + 1);
  ExpectPagesReturn();
  ExpectGoodRequest();
}

TEST_F(ServerE2eTest, DuplicateLiveRequestIdAndIdempotentAbort) {
  StartServer(DefaultArgs());
  v1::GenerateRequest first = TokenRequest(SyntheticPrompt(100), 12000);
  first.set_request_id("dup");
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub_->Generate(&ctx, first);
  v1::GenerateResponse m;
  while (reader->Read(&m) && !m.has_tokens()) {
  }
  ASSERT_TRUE(m.has_tokens()) << "the first request never produced a token";

  v1::GenerateRequest second = TokenRequest(SyntheticPrompt(10), 4);
  second.set_request_id("dup");
  StreamResult dup = Generate(*stub_, second);
  EXPECT_EQ(dup.status.error_code(), grpc::StatusCode::ALREADY_EXISTS) << Describe(dup.status);
  EXPECT_THAT(dup.status.error_message(), HasSubstr("dup"));

  v1::AbortRequest abort;
  abort.set_request_id("dup");
  v1::AbortResponse aresp;
  grpc::ClientContext a1;
  ASSERT_TRUE(stub_->Abort(&a1, abort, &aresp).ok());
  EXPECT_TRUE(aresp.was_live());
  std::optional<v1::Finished> finished;
  while (reader->Read(&m)) {
    if (m.has_finished()) finished = m.finished();
  }
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << Describe(s);
  ASSERT_TRUE(finished.has_value()) << "an aborted stream still ends with Finished";
  EXPECT_EQ(finished->reason(), v1::FINISH_REASON_CANCELLED);

  grpc::ClientContext a2;
  ASSERT_TRUE(stub_->Abort(&a2, abort, &aresp).ok());  // idempotent
  EXPECT_FALSE(aresp.was_live());
  grpc::ClientContext a3;
  abort.set_request_id("never-existed");
  ASSERT_TRUE(stub_->Abort(&a3, abort, &aresp).ok());
  EXPECT_FALSE(aresp.was_live());

  // The id is free again once its request ended.
  StreamResult reuse = Generate(*stub_, second);
  EXPECT_TRUE(reuse.status.ok()) << Describe(reuse.status);
  ExpectPagesReturn();
}

TEST_F(ServerE2eTest, HealthAndReflection) {
  StartServer(DefaultArgs());
  EXPECT_EQ(HealthStatus(server_->channel()), "SERVING");
  auto health = grpc::health::v1::Health::NewStub(server_->channel());
  {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest req;
    req.set_service("needle.v1.Generation");
    grpc::health::v1::HealthCheckResponse resp;
    ASSERT_TRUE(health->Check(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  }
  {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest req;
    req.set_service("no.such.Service");
    grpc::health::v1::HealthCheckResponse resp;
    EXPECT_EQ(health->Check(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    auto watch = health->Watch(&ctx, grpc::health::v1::HealthCheckRequest());
    grpc::health::v1::HealthCheckResponse resp;
    ASSERT_TRUE(watch->Read(&resp));
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
    ctx.TryCancel();
    watch->Finish();
  }

  namespace refl = grpc::reflection::v1alpha;
  auto reflection = refl::ServerReflection::NewStub(server_->channel());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  auto stream = reflection->ServerReflectionInfo(&ctx);
  refl::ServerReflectionRequest list;
  list.set_list_services("");
  ASSERT_TRUE(stream->Write(list));
  refl::ServerReflectionResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_TRUE(resp.has_list_services_response()) << resp.ShortDebugString();
  std::vector<std::string> services;
  for (const auto& s : resp.list_services_response().service()) services.push_back(s.name());
  EXPECT_THAT(services, Contains("needle.v1.Generation"));
  EXPECT_THAT(services, Contains("grpc.health.v1.Health"));
  EXPECT_THAT(services, Contains("grpc.reflection.v1alpha.ServerReflection"));

  // Reflection can describe the API, so grpcurl works without the .proto files.
  refl::ServerReflectionRequest symbol;
  symbol.set_file_containing_symbol("needle.v1.Generation");
  ASSERT_TRUE(stream->Write(symbol));
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_TRUE(resp.has_file_descriptor_response()) << resp.ShortDebugString();
  bool found = false;
  for (const std::string& bytes : resp.file_descriptor_response().file_descriptor_proto()) {
    google::protobuf::FileDescriptorProto file;
    ASSERT_TRUE(file.ParseFromString(bytes));
    if (file.name() != "needle/v1/generation.proto") continue;
    found = true;
    ASSERT_EQ(file.service_size(), 1);
    std::vector<std::string> methods;
    for (const auto& method : file.service(0).method()) methods.push_back(method.name());
    EXPECT_THAT(methods, ::testing::UnorderedElementsAre("Generate", "Tokenize", "GetModelInfo", "Abort", "GetStats"));
  }
  EXPECT_TRUE(found);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ServerE2eTest, SigtermDrainsInFlightRefusesNewAndExitsZero) {
  StartServer({"--prefill_chunk=64", "--grace_period_s=20"});
  // A request long enough to still be decoding when the signal arrives.
  v1::GenerateRequest long_req = TokenRequest(SyntheticPrompt(200), 1500);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(25));
  auto reader = stub_->Generate(&ctx, long_req);
  v1::GenerateResponse m;
  size_t tokens = 0;
  while (tokens == 0 && reader->Read(&m)) tokens += m.has_tokens() ? m.tokens().token_ids_size() : 0;
  ASSERT_GT(tokens, 0u);

  server_->process().Signal(SIGTERM);
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (HealthStatus(server_->channel()) == "SERVING" && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(HealthStatus(server_->channel()), "NOT_SERVING");
  StreamResult refused = Generate(*stub_, TokenRequest(SyntheticPrompt(10), 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE) << Describe(refused.status);

  std::optional<v1::Finished> finished;
  while (reader->Read(&m)) {
    if (m.has_tokens()) tokens += m.tokens().token_ids_size();
    if (m.has_finished()) finished = m.finished();
  }
  grpc::Status s = reader->Finish();
  EXPECT_TRUE(s.ok()) << Describe(s);
  ASSERT_TRUE(finished.has_value());
  EXPECT_EQ(finished->reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(tokens, 1500u);
  EXPECT_EQ(server_->process().Wait(std::chrono::seconds(20)), 0);
}

TEST_F(ServerE2eTest, GracePeriodOverCancelsTheRestAndExitsZero) {
  StartServer({"--grace_period_s=0.2"});
  v1::GenerateRequest long_req = TokenRequest(SyntheticPrompt(50), 12000);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(25));
  auto reader = stub_->Generate(&ctx, long_req);
  v1::GenerateResponse m;
  while (reader->Read(&m) && !m.has_tokens()) {
  }
  server_->process().Signal(SIGTERM);
  while (reader->Read(&m)) {
  }
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << Describe(s);
  EXPECT_EQ(server_->process().Wait(std::chrono::seconds(20)), 0);
}

TEST_F(ServerE2eTest, NeedleClientBinaryPrintsJson) {
  StartServer(DefaultArgs());
  std::string error;
  auto client = Subprocess::Spawn({NEEDLE_CLIENT_PATH, "--server", server_->address(), "--prompt-tokens", "150",
                                   "--max-tokens", "12", "--temperature", "0", "--ignore-eos", "--json"},
                                  &error);
  ASSERT_NE(client, nullptr) << error;
  const std::string out = client->ReadAll(std::chrono::seconds(30));
  ASSERT_EQ(client->Wait(std::chrono::seconds(10)), 0) << out;
  nlohmann::json j = nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(j.is_discarded()) << out;
  EXPECT_EQ(j["status"]["code"], "OK");
  EXPECT_EQ(j["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["prompt_tokens"], 150);
  EXPECT_EQ(j["usage"]["completion_tokens"], 12);
  EXPECT_EQ(j["client"]["inter_token"]["n"], 11);
  EXPECT_GT(j["client"]["first_token_s"].get<double>(), 0);
  EXPECT_GE(j["server"]["first_token_s"].get<double>(), 0);
  // Same prompt rule, greedy: the binary sees what the stub sees.
  StreamResult direct = Generate(*stub_, TokenRequest(SyntheticPrompt(150), 12));
  ASSERT_TRUE(direct.status.ok());
  EXPECT_EQ(j["token_ids"].get<std::vector<uint32_t>>(), direct.ids);

  // Errors come back as a non-zero exit and the status on stderr.
  auto bad = Subprocess::Spawn({NEEDLE_CLIENT_PATH, "--server", server_->address(), "--prompt-tokens", "10",
                                "--max-tokens", "0"},
                               &error);
  ASSERT_NE(bad, nullptr) << error;
  bad->ReadAll(std::chrono::seconds(30));
  EXPECT_EQ(bad->Wait(std::chrono::seconds(10)), 1);
}

TEST_F(ServerE2eTest, PythonClientStreams) {
  if (access("/usr/bin/python3", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/python3";
  StartServer(DefaultArgs());
  std::string error;
  auto probe = Subprocess::Spawn({"/usr/bin/python3", "-c", "import grpc, google.protobuf"}, &error);
  ASSERT_NE(probe, nullptr) << error;
  if (probe->Wait(std::chrono::seconds(30)) != 0) GTEST_SKIP() << "python3-grpcio / python3-protobuf missing";
  auto py = Subprocess::Spawn({"/usr/bin/python3", NEEDLE_PYTHON_CLIENT_PATH, "--server", server_->address(),
                               "--prompt-tokens", "150", "--max-tokens", "12", "--temperature", "0",
                               "--ignore-eos", "--json"},
                              &error);
  ASSERT_NE(py, nullptr) << error;
  const std::string out = py->ReadAll(std::chrono::seconds(30));
  ASSERT_EQ(py->Wait(std::chrono::seconds(10)), 0) << out;
  nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << out;
  EXPECT_EQ(j["finish_reason"], "length");
  StreamResult direct = Generate(*stub_, TokenRequest(SyntheticPrompt(150), 12));
  ASSERT_TRUE(direct.status.ok());
  EXPECT_EQ(j["token_ids"].get<std::vector<uint32_t>>(), direct.ids);
}

}  // namespace
}  // namespace needle::e2e
