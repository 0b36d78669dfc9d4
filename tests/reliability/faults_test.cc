// Fault handling of a real needle-server process (label e2e), the cases tests/e2e does not already
// cover (docs/reliability.md maps every case to its test):
//   - a client that cancels, or whose deadline passes, while its request is still queued;
//   - deadlines that pass mid-prefill and mid-decode while a batch mate keeps running;
//   - more requests than the KV pools hold: they queue, every one finishes with all its tokens;
//   - a full queue (--max_queue): RESOURCE_EXHAUSTED, and what was accepted still finishes;
//   - a slow reader stalled while other clients are served;
//   - SIGTERM under load, within and past the grace period;
//   - a request over the gRPC receive limit (RESOURCE_EXHAUSTED) and unknown fields (ignored).
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "google/protobuf/unknown_field_set.h"
#include "gtest/gtest.h"
#include "tests/reliability/harness.h"

namespace needle::reliability {
namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

std::chrono::system_clock::time_point In(std::chrono::milliseconds d) { return std::chrono::system_clock::now() + d; }

// A stream read on its own thread, from a context the test owns (so it can cancel it).
class BackgroundStream {
 public:
  BackgroundStream(v1::Generation::Stub& stub, v1::GenerateRequest request,
                   std::chrono::milliseconds timeout = std::chrono::milliseconds(180'000)) {
    ctx_.set_deadline(In(timeout));
    thread_ = std::thread([this, &stub, request = std::move(request)] {
      StreamResult r = Generate(stub, request, &ctx_, [this](const v1::GenerateResponse& m, grpc::ClientContext&) {
        if (m.has_tokens()) tokens_ += m.tokens().token_ids_size();
        messages_++;
      });
      std::lock_guard<std::mutex> lock(mu_);
      result_ = std::move(r);
    });
  }
  ~BackgroundStream() {
    if (thread_.joinable()) {
      ctx_.TryCancel();
      thread_.join();
    }
  }
  // Waits until the stream has delivered at least `n` tokens; false on timeout.
  bool WaitForTokens(int n, std::chrono::milliseconds timeout = std::chrono::milliseconds(60'000)) {
    const auto end = Clock::now() + timeout;
    while (tokens_ < n && Clock::now() < end) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    return tokens_ >= n;
  }
  void Cancel() { ctx_.TryCancel(); }
  StreamResult Join() {
    thread_.join();
    std::lock_guard<std::mutex> lock(mu_);
    return result_;
  }
  int tokens() const { return tokens_; }
  int messages() const { return messages_; }

 private:
  grpc::ClientContext ctx_;
  std::atomic<int> tokens_{0};
  std::atomic<int> messages_{0};
  std::mutex mu_;
  StreamResult result_;
  std::thread thread_;
};

std::vector<uint64_t> FreePages(const v1::ServerStats& s) {
  std::vector<uint64_t> free;
  for (const v1::CachePool& p : s.pools()) free.push_back(p.free_pages());
  return free;
}

// A stream that ended normally with exactly the tokens it asked for.
void ExpectComplete(const StreamResult& r, uint32_t max_tokens, const std::string& what) {
  EXPECT_TRUE(r.status.ok()) << what << ": " << Describe(r.status);
  EXPECT_EQ(r.ids.size(), max_tokens) << what;
  ASSERT_TRUE(r.finished.has_value()) << what;
  EXPECT_TRUE(r.finished_last) << what;
  EXPECT_EQ(r.finished->reason(), v1::FINISH_REASON_LENGTH) << what;
  EXPECT_EQ(r.finished->usage().completion_tokens(), max_tokens) << what;
}

TEST(ReliabilityFaults, QueuedRequestCancelledOrTimedOutNeverRunsAndTheRunningOneFinishes) {
  Server server;
  ASSERT_NO_FATAL_FAILURE(server.Start({"--max_batch=1", "--prefill_chunk=64"}));
  const uint64_t cancelled0 = server.baseline().cancelled();
  // A holds the only batch slot long enough for everything below.
  constexpr uint32_t kLong = 6000;
  BackgroundStream a(server.stub(), TokenRequest(SyntheticPrompt(50), kLong));
  ASSERT_TRUE(a.WaitForTokens(1)) << "the running request produced nothing";
  ASSERT_TRUE(server.WaitForStats([](const v1::ServerStats& s) { return s.running() == 1; }));
  const std::vector<uint64_t> free_with_a = FreePages(server.Stats());

  // B: queued behind A, then the client cancels (the same path as a disconnect: OnCancel).
  BackgroundStream b(server.stub(), TokenRequest(SyntheticPrompt(40, 3), 8));
  ASSERT_TRUE(server.WaitForStats([](const v1::ServerStats& s) { return s.waiting() == 1; }))
      << "B never queued: " << server.Stats().ShortDebugString();
  b.Cancel();
  StreamResult rb = b.Join();
  EXPECT_EQ(rb.status.error_code(), grpc::StatusCode::CANCELLED) << Describe(rb.status);
  EXPECT_EQ(rb.messages, 0) << "a queued request streamed something";
  server.WaitForCancelled(cancelled0 + 1);

  // C: queued behind A until its deadline passes. It streams no token and no progress. The engine
  // checks deadlines itself, so when it notices before gRPC does, the stream carries the final
  // event (reason deadline, no tokens) before DEADLINE_EXCEEDED: a race, allowed.
  StreamResult rc = Generate(server.stub(), TokenRequest(SyntheticPrompt(40, 5), 8), std::chrono::milliseconds(300));
  EXPECT_EQ(rc.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << Describe(rc.status);
  EXPECT_TRUE(rc.ids.empty()) << "a queued request streamed tokens";
  EXPECT_EQ(rc.progress_events, 0);
  EXPECT_LE(rc.messages, 1);
  if (rc.messages == 1) {
    ASSERT_TRUE(rc.finished.has_value()) << "the one message of a timed-out queued request is not the final event";
    EXPECT_EQ(rc.finished->reason(), v1::FINISH_REASON_DEADLINE);
    EXPECT_EQ(rc.finished->usage().completion_tokens(), 0u);
  }
  server.WaitForCancelled(cancelled0 + 2);

  // Neither held a page; A is still the one running, and then finishes with every token. (The
  // counters move when a request ends, the gauges at the end of that step: poll for the snapshot.)
  v1::ServerStats mid;
  ASSERT_TRUE(server.WaitForStats([&mid](const v1::ServerStats& s) {
    mid = s;
    return s.waiting() == 0;
  })) << mid.ShortDebugString();
  EXPECT_EQ(mid.running(), 1u);
  EXPECT_EQ(FreePages(mid), free_with_a) << mid.ShortDebugString();
  ASSERT_LT(a.tokens(), static_cast<int>(kLong)) << "A finished before the queued cases ran; lengthen it";
  StreamResult ra = a.Join();
  ExpectComplete(ra, kLong, "A");
  server.ExpectPagesReturn();
  EXPECT_EQ(server.Stats().cancelled(), cancelled0 + 2);
}

TEST(ReliabilityFaults, DeadlinesMidPrefillAndMidDecodeEndOnlyTheirRequest) {
  Server server;
  ASSERT_NO_FATAL_FAILURE(server.Start({"--max_batch=2", "--prefill_chunk=64"}));
  const uint64_t cancelled0 = server.baseline().cancelled();
  constexpr uint32_t kLong = 6000;
  BackgroundStream mate(server.stub(), TokenRequest(SyntheticPrompt(30, 1), kLong));
  ASSERT_TRUE(mate.WaitForTokens(1));

  // Mid-prefill: 4000 prompt tokens in chunks of 64 take seconds; the deadline passes in between.
  StreamResult p = Generate(server.stub(), TokenRequest(SyntheticPrompt(4000, 2), 16), std::chrono::milliseconds(1500));
  EXPECT_EQ(p.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << Describe(p.status);
  EXPECT_GE(p.progress_events, 1) << "the deadline passed before the prefill started";
  EXPECT_TRUE(p.ids.empty()) << "the deadline passed after the prefill";
  server.WaitForCancelled(cancelled0 + 1);

  // Mid-decode.
  StreamResult d =
      Generate(server.stub(), TokenRequest(SyntheticPrompt(20, 3), 12000), std::chrono::milliseconds(1500));
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << Describe(d.status);
  EXPECT_FALSE(d.ids.empty()) << "the deadline passed before the decode started";
  EXPECT_LT(d.ids.size(), 12000u);
  server.WaitForCancelled(cancelled0 + 2);

  ASSERT_LT(mate.tokens(), static_cast<int>(kLong)) << "the batch mate finished first; lengthen it";
  ExpectComplete(mate.Join(), kLong, "batch mate");
  server.ExpectPagesReturn();
}

// More requests than the KV pools hold at once. Admission reserves prompt + max_tokens, so the rest
// wait (FIFO) and are admitted as pages return: every request finishes with all the tokens it asked
// for, and the pools never hold more than they have.
TEST(ReliabilityFaults, RequestsBeyondTheKvPoolsQueueAndAllFinishInFull) {
  Server server;
  // tiny-llama (dense: one selection pool, context 8192). One whole context takes 2 layers x 2 KV
  // heads x (16 + 16) x 4 bytes x 8192 tokens = 4 MiB: 8192 / 64 = 128 pages.
  ASSERT_NO_FATAL_FAILURE(server.Start(
      {"--model=tiny-llama", "--kv_cache_bytes=4194304", "--max_batch=16", "--prefill_chunk=512"}));
  ASSERT_EQ(server.baseline().pools_size(), 1);
  const uint64_t total = server.baseline().pools(0).total_pages();
  ASSERT_EQ(total, 128u) << server.baseline().ShortDebugString();
  // Each request reserves ceil((2200 + 48) / 64) = 36 pages: three fit, not four.
  constexpr int kRequests = 8;
  constexpr uint32_t kMaxTokens = 48;
  constexpr uint64_t kPagesEach = (2200 + kMaxTokens + 63) / 64;
  const uint64_t fit = total / kPagesEach;
  ASSERT_EQ(fit, 3u);

  std::atomic<bool> done{false};
  uint32_t max_running = 0, max_waiting = 0;
  uint64_t min_free = total;
  std::thread sampler([&] {
    while (!done) {
      v1::ServerStats s = server.Stats();
      max_running = std::max(max_running, s.running());
      max_waiting = std::max(max_waiting, s.waiting());
      min_free = std::min<uint64_t>(min_free, s.pools(0).free_pages());
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  std::vector<StreamResult> results(kRequests);
  std::vector<std::thread> clients;
  for (int i = 0; i < kRequests; ++i) {
    clients.emplace_back(
        [&, i] { results[i] = Generate(server.stub(), TokenRequest(SyntheticPrompt(2200, 7 * i), kMaxTokens)); });
  }
  for (std::thread& t : clients) t.join();
  done = true;
  sampler.join();
  for (int i = 0; i < kRequests; ++i) ExpectComplete(results[i], kMaxTokens, "request " + std::to_string(i));
  EXPECT_LE(max_running, fit);
  EXPECT_GE(max_waiting, 1u) << "nothing ever queued: the test did not oversubscribe the pools";
  EXPECT_GE(min_free, total - fit * kPagesEach);
  server.ExpectPagesReturn();
  v1::ServerStats end = server.Stats();
  EXPECT_EQ(end.finished(), server.baseline().finished() + kRequests);
  EXPECT_EQ(end.refused(), server.baseline().refused());
  EXPECT_EQ(end.preempted(), 0u);
}

TEST(ReliabilityFaults, FullQueueRefusesWithResourceExhaustedAndAcceptedOnesFinish) {
  Server server;
  ASSERT_NO_FATAL_FAILURE(server.Start({"--max_batch=1", "--max_queue=2", "--prefill_chunk=64"}));
  constexpr uint32_t kLong = 4000;
  BackgroundStream a(server.stub(), TokenRequest(SyntheticPrompt(50), kLong));
  ASSERT_TRUE(a.WaitForTokens(1));
  BackgroundStream b(server.stub(), TokenRequest(SyntheticPrompt(40, 1), 8));
  BackgroundStream c(server.stub(), TokenRequest(SyntheticPrompt(40, 2), 8));
  ASSERT_TRUE(server.WaitForStats([](const v1::ServerStats& s) { return s.waiting() == 2; }))
      << server.Stats().ShortDebugString();
  StreamResult d = Generate(server.stub(), TokenRequest(SyntheticPrompt(40, 3), 8));
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << Describe(d.status);
  EXPECT_THAT(d.status.error_message(), HasSubstr("queue is full"));
  EXPECT_EQ(d.messages, 0);
  ASSERT_LT(a.tokens(), static_cast<int>(kLong)) << "A finished before the queue filled; lengthen it";
  ExpectComplete(a.Join(), kLong, "A");
  ExpectComplete(b.Join(), 8, "B");
  ExpectComplete(c.Join(), 8, "C");
  EXPECT_EQ(server.Stats().refused(), server.baseline().refused() + 1);
  server.ExpectPagesReturn();
}

TEST(ReliabilityFaults, StalledSlowReaderDoesNotStopOtherClients) {
  Server server;
  // The bound takes ~2 s of decoding to reach in the normal build (~12 s under ASan); the other
  // clients need a fraction of that.
  ASSERT_NO_FATAL_FAILURE(server.Start({"--max_buffered_tokens=2000", "--prefill_chunk=64"}));
  const uint64_t cancelled0 = server.baseline().cancelled();
  // A client that takes little from the wire: small HTTP/2 stream window, no window growth.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 1024);
  auto slow_channel = grpc::CreateCustomChannel(server.address(), grpc::InsecureChannelCredentials(), args);
  auto slow_stub = v1::Generation::NewStub(slow_channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(120)));
  auto reader = slow_stub->Generate(&ctx, TokenRequest(SyntheticPrompt(50), 12000));
  v1::GenerateResponse m;
  ASSERT_TRUE(reader->Read(&m));
  // The slow reader now reads nothing. Meanwhile other clients are served in full, while it is
  // still live (the engine keeps generating into its bounded buffer).
  for (int i = 0; i < 3; ++i) {
    const auto t0 = Clock::now();
    StreamResult other = Generate(server.stub(), TokenRequest(SyntheticPrompt(64, 10 + i), 32));
    ExpectComplete(other, 32, "other client " + std::to_string(i));
    EXPECT_LT(Clock::now() - t0, std::chrono::seconds(20));
    v1::ServerStats s = server.Stats();
    EXPECT_EQ(s.cancelled(), cancelled0) << "the slow reader ended before the other clients were served";
  }
  // The buffer bound then ends the slow stream: RESOURCE_EXHAUSTED once it reads again.
  server.WaitForCancelled(cancelled0 + 1, std::chrono::seconds(90));
  size_t tokens = 0;
  while (reader->Read(&m)) tokens += m.has_tokens() ? m.tokens().token_ids_size() : 0;
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << Describe(s);
  EXPECT_LT(tokens, 12000u);
  server.ExpectPagesReturn();
}

// SIGTERM while requests run and wait: with a long enough grace period every accepted request,
// queued ones included, finishes in full; new ones get UNAVAILABLE; the server exits 0.
TEST(ReliabilityFaults, SigtermUnderLoadFinishesEveryAcceptedStream) {
  Server server;
  ASSERT_NO_FATAL_FAILURE(server.Start({"--max_batch=4", "--prefill_chunk=64", "--grace_period_s=120"}));
  constexpr int kStreams = 10;
  std::vector<std::unique_ptr<BackgroundStream>> streams;
  std::vector<uint32_t> want;
  for (int i = 0; i < kStreams; ++i) {
    want.push_back(300 + 97 * i);
    streams.push_back(
        std::make_unique<BackgroundStream>(server.stub(), TokenRequest(SyntheticPrompt(100 + 50 * i, i), want.back())));
  }
  ASSERT_TRUE(server.WaitForStats([](const v1::ServerStats& s) { return s.running() == 4 && s.waiting() >= 1; }))
      << server.Stats().ShortDebugString();
  server.process().process().Signal(SIGTERM);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (e2e::HealthStatus(server.process().channel()) == "SERVING" && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  StreamResult late = Generate(server.stub(), TokenRequest(SyntheticPrompt(10), 4));
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::UNAVAILABLE) << Describe(late.status);
  for (int i = 0; i < kStreams; ++i) ExpectComplete(streams[i]->Join(), want[i], "stream " + std::to_string(i));
  EXPECT_EQ(server.process().process().Wait(std::chrono::seconds(60)), 0);
}

// Past the grace period, whatever is still running or queued ends with UNAVAILABLE (never a silent
// OK with fewer tokens), and the server still exits 0, promptly.
TEST(ReliabilityFaults, SigtermUnderLoadPastTheGracePeriodEndsEveryStream) {
  Server server;
  ASSERT_NO_FATAL_FAILURE(server.Start({"--max_batch=4", "--prefill_chunk=64", "--grace_period_s=0.5"}));
  constexpr int kStreams = 6;
  std::vector<std::unique_ptr<BackgroundStream>> streams;
  for (int i = 0; i < kStreams; ++i) {
    streams.push_back(std::make_unique<BackgroundStream>(server.stub(), TokenRequest(SyntheticPrompt(60, i), 12000)));
  }
  ASSERT_TRUE(server.WaitForStats([](const v1::ServerStats& s) { return s.running() == 4 && s.waiting() == 2; }))
      << server.Stats().ShortDebugString();
  const auto t0 = Clock::now();
  server.process().process().Signal(SIGTERM);
  for (int i = 0; i < kStreams; ++i) {
    StreamResult r = streams[i]->Join();
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << i << ": " << Describe(r.status);
    EXPECT_LT(r.ids.size(), 12000u) << i;
    if (r.finished) {
      EXPECT_EQ(r.finished->reason(), v1::FINISH_REASON_CANCELLED) << i;
    }
  }
  EXPECT_EQ(server.process().process().Wait(std::chrono::seconds(30)), 0);
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(20));
}

// gRPC refuses a request larger than the server's receive limit before needle sees it.
TEST(ReliabilityFaults, RequestOverTheMessageSizeLimitGetsResourceExhausted) {
  Server server;
  ASSERT_NO_FATAL_FAILURE(server.Start({}));
  // The default limit, 64 MiB (ServerOptions::max_message_bytes).
  v1::GenerateRequest huge;
  huge.set_text(std::string((64u << 20) + 64, 'a'));
  huge.mutable_stopping()->set_max_tokens(1);
  StreamResult r = Generate(server.stub(), huge);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << Describe(r.status);
  EXPECT_EQ(r.messages, 0);
  server.ExpectGoodRequest();
  server.ExpectPagesReturn();

  Server small;
  ASSERT_NO_FATAL_FAILURE(small.Start({"--max_message_bytes=65536"}));
  v1::GenerateRequest over;
  over.set_text(std::string(70'000, 'a'));
  r = Generate(small.stub(), over);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << Describe(r.status);
  // Just under the limit the request reaches needle, whose own check answers (60000 tokens do not
  // fit the context).
  v1::GenerateRequest under;
  under.set_text(std::string(60'000, 'a'));
  ASSERT_LT(under.ByteSizeLong(), 65536u);
  r = Generate(small.stub(), under);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::OUT_OF_RANGE) << Describe(r.status);
  small.ExpectGoodRequest();
}

// The request has no enum field (FinishReason only appears in responses), so proto3's open-enum rule
// never applies to input. Unknown fields, at the top level and inside nested messages, as a newer
// client would send, are ignored: the request is served as if they were absent.
TEST(ReliabilityFaults, UnknownFieldsAreIgnored) {
  Server server;
  ASSERT_NO_FATAL_FAILURE(server.Start({}));
  v1::GenerateRequest plain = TokenRequest(SyntheticPrompt(40), 6);
  StreamResult want = Generate(server.stub(), plain);
  ASSERT_TRUE(want.status.ok()) << Describe(want.status);

  v1::GenerateRequest extended = plain;
  auto add_unknown = [](google::protobuf::Message* m) {
    google::protobuf::UnknownFieldSet* u = m->GetReflection()->MutableUnknownFields(m);
    u->AddVarint(1000, 42);
    u->AddLengthDelimited(1001, "from a newer client");
    u->AddFixed32(1002, 7);
    u->AddFixed64(1003, 9);
  };
  add_unknown(&extended);
  add_unknown(extended.mutable_sampling());
  add_unknown(extended.mutable_stopping());
  add_unknown(extended.mutable_token_ids());
  ASSERT_GT(extended.ByteSizeLong(), plain.ByteSizeLong());
  StreamResult got = Generate(server.stub(), extended);
  ASSERT_TRUE(got.status.ok()) << Describe(got.status);
  EXPECT_EQ(got.ids, want.ids);

  // The same bytes hand-encoded and sent raw: an unknown varint field 15 and a length-delimited
  // field 16 around the known ones.
  std::string raw = plain.SerializeAsString();
  raw += std::string("\x78\x05", 2);         // field 15, varint 5
  raw += std::string("\x82\x01\x03xyz", 6);  // field 16, 3 bytes
  size_t tokens = 0;
  grpc::Status s = RawGenerate(server.process().channel(), raw, &tokens);
  EXPECT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(tokens, 6u);
  server.ExpectPagesReturn();
}

}  // namespace
}  // namespace needle::reliability
