// Test support for the reliability suites (tests/reliability/*): a needle-server subprocess on
// 127.0.0.1:0 with helpers to stream a Generate call to its end, poll GetStats until the KV pools
// are back at their baseline, send raw (hand-encoded) request bytes, and read the server's resident
// memory. Built on tests/e2e/subprocess.h; every check reports through gtest.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "needle/v1/generation.grpc.pb.h"
#include "tests/e2e/raw_generate.h"
#include "tests/e2e/subprocess.h"

namespace needle::reliability {

// The demo preset: byte vocabulary (259 ids), 16384 positions.
inline constexpr uint32_t kDemoVocab = 259;
inline constexpr uint32_t kDemoContext = 16384;

// N ids cycling over the printable bytes, shifted by `offset`.
std::vector<uint32_t> SyntheticPrompt(int n, int offset = 0);

// A greedy request that ignores EOS, so that a normal end means exactly `max_tokens` tokens.
v1::GenerateRequest TokenRequest(const std::vector<uint32_t>& prompt, uint32_t max_tokens);

struct StreamResult {
  grpc::Status status;
  std::vector<uint32_t> ids;
  int progress_events = 0;
  int messages = 0;
  bool finished_last = true;  // nothing arrived after Finished
  std::optional<v1::Finished> finished;
};

std::string Describe(const grpc::Status& s);

// Called on every message; may cancel the call through the context.
using OnMessage = std::function<void(const v1::GenerateResponse&, grpc::ClientContext&)>;

// Runs a Generate call to its end with a deadline `timeout` from now.
StreamResult Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request,
                      std::chrono::milliseconds timeout = std::chrono::milliseconds(120'000),
                      const OnMessage& on_message = {});
// The same on a context the caller owns (and may TryCancel() from another thread while this runs);
// the caller sets its deadline.
StreamResult Generate(v1::Generation::Stub& stub, const v1::GenerateRequest& request, grpc::ClientContext* ctx,
                      const OnMessage& on_message = {});

using e2e::RawGenerate;  // tests/e2e/raw_generate.h

// VmRSS of process `pid` in KiB (from /proc/PID/status), or -1.
int64_t ResidentKib(pid_t pid);

// A needle-server subprocess and a stub on its channel.
class Server {
 public:
  // Starts needle-server with `args` (the demo model unless they name another) and waits until it is
  // SERVING and idle with every KV page free. Fails the test (ASSERT) otherwise.
  void Start(const std::vector<std::string>& args);

  v1::Generation::Stub& stub() { return *stub_; }
  e2e::ServerProcess& process() { return *server_; }
  const std::string& address() const { return server_->address(); }
  const v1::ServerStats& baseline() const { return baseline_; }

  v1::ServerStats Stats();
  // Polls GetStats until `done(stats)` holds; false after `timeout`.
  bool WaitForStats(const std::function<bool(const v1::ServerStats&)>& done,
                    std::chrono::milliseconds timeout = std::chrono::milliseconds(20'000));
  // Nothing running or waiting and every pool back at its baseline free pages (ADD_FAILURE if not).
  void ExpectPagesReturn(std::chrono::milliseconds timeout = std::chrono::milliseconds(20'000));
  // Waits until the engine has counted `count` cancelled (or deadline-ended) requests.
  void WaitForCancelled(uint64_t count, std::chrono::milliseconds timeout = std::chrono::milliseconds(20'000));
  // A short greedy request the server must serve in full.
  void ExpectGoodRequest();

 private:
  std::unique_ptr<e2e::ServerProcess> server_;
  std::unique_ptr<v1::Generation::Stub> stub_;
  v1::ServerStats baseline_;
};

}  // namespace needle::reliability
