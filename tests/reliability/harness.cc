// Reliability test support. See harness.h.
#include "tests/reliability/harness.h"

#include <fstream>
#include <sstream>
#include <thread>

#include "gtest/gtest.h"

namespace needle::reliability {

using Clock = std::chrono::steady_clock;

std::vector<uint32_t> SyntheticPrompt(int n, int offset) {
  std::vector<uint32_t> ids;
  ids.reserve(static_cast<size_t>(n));
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

std::string Describe(const grpc::Status& s) {
  return "status " + std::to_string(s.error_code()) + " \"" + s.error_message() + "\"";
}

StreamResult Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request, grpc::ClientContext* ctx,
                      const OnMessage& on_message) {
  StreamResult out;
  auto reader = stub.Generate(ctx, request);
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    ++out.messages;
    if (out.finished) out.finished_last = false;
    if (m.has_tokens()) {
      out.ids.insert(out.ids.end(), m.tokens().token_ids().begin(), m.tokens().token_ids().end());
    } else if (m.has_progress()) {
      ++out.progress_events;
    } else if (m.has_finished()) {
      out.finished = m.finished();
    }
    if (on_message) on_message(m, *ctx);
  }
  out.status = reader->Finish();
  return out;
}

StreamResult Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request, std::chrono::milliseconds timeout,
                      const OnMessage& on_message) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  return Generate(stub, request, &ctx, on_message);
}

int64_t ResidentKib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      int64_t kib = -1;
      fields >> kib;
      return kib;
    }
  }
  return -1;
}

void Server::Start(const std::vector<std::string>& args) {
  std::string error;
  server_ = e2e::ServerProcess::Start(args, &error);
  ASSERT_NE(server_, nullptr) << error;
  stub_ = v1::Generation::NewStub(server_->channel());
  // The warm-up request has finished, but stats are published at the end of a step: wait for an
  // idle snapshot with every page free.
  const bool idle = WaitForStats([](const v1::ServerStats& s) {
    bool all_free = s.running() == 0 && s.waiting() == 0 && s.pools_size() > 0;
    for (const v1::CachePool& p : s.pools()) all_free = all_free && p.free_pages() == p.total_pages();
    return all_free;
  });
  baseline_ = Stats();
  ASSERT_TRUE(idle) << "not idle after warm-up: " << baseline_.ShortDebugString();
}

v1::ServerStats Server::Stats() {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ServerStats stats;
  grpc::Status s = stub_->GetStats(&ctx, v1::GetStatsRequest(), &stats);
  EXPECT_TRUE(s.ok()) << Describe(s);
  return stats;
}

bool Server::WaitForStats(const std::function<bool(const v1::ServerStats&)>& done, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (done(Stats())) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

void Server::ExpectPagesReturn(std::chrono::milliseconds timeout) {
  auto back = [this](const v1::ServerStats& s) {
    bool ok = s.running() == 0 && s.waiting() == 0 && s.pools_size() == baseline_.pools_size();
    for (int i = 0; ok && i < s.pools_size(); ++i) ok = s.pools(i).free_pages() == baseline_.pools(i).free_pages();
    return ok;
  };
  if (!WaitForStats(back, timeout)) {
    ADD_FAILURE() << "KV pages did not return to baseline within " << timeout.count()
                  << " ms: " << Stats().ShortDebugString() << " (baseline " << baseline_.ShortDebugString() << ")";
  }
}

void Server::WaitForCancelled(uint64_t count, std::chrono::milliseconds timeout) {
  WaitForStats([count](const v1::ServerStats& s) { return s.cancelled() >= count; }, timeout);
  EXPECT_EQ(Stats().cancelled(), count);
}

void Server::ExpectGoodRequest() {
  StreamResult r = Generate(*stub_, TokenRequest(SyntheticPrompt(32), 4));
  EXPECT_TRUE(r.status.ok()) << Describe(r.status);
  EXPECT_EQ(r.ids.size(), 4u);
}

}  // namespace needle::reliability
