// needle-bench: load and latency benchmark against a running needle-server. C concurrent clients each
// send requests of L synthetic prompt tokens asking for O output tokens until N requests are done;
// reports time to first token, per-token latency (client-side gaps between streamed tokens; mean,
// p50, p90, p99, max), output tokens/s, and the server's own timings, as a table and as JSON. With one
// wave of requests (N == C) it also reports the gaps while all C requests were decoding at once (after
// the last first token, before the first request finished): the batch-C decode step on its own, without
// the steps that also carry other requests' prefill chunks.
// A benchmark, not a test: it asserts nothing and prints what it measured.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "clients/client_common.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "needle/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace {

using namespace needle::clients;  // NOLINT
using Clock = std::chrono::steady_clock;

constexpr char kUsage[] = R"(usage: needle-bench [options]
  --server HOST:PORT      server address (default 127.0.0.1:50051)
  --concurrency C         concurrent streams (default 1)
  --prompt-tokens L       synthetic prompt length (default 1024)
  --max-tokens O          output tokens per request (default 128; EOS ignored)
  --requests N            measured requests (default C)
  --warmup N              unmeasured requests first, one at a time (default 1)
  --temperature T         default 0 (greedy)
  --timeout-s S           per-request deadline (default 3600)
  --label TEXT            free text stored in the JSON (e.g. the model and backend)
  --json FILE             write the results as JSON to FILE
  --no-progress           no progress bar on stderr
)";

struct Options {
  std::string server = "127.0.0.1:50051";
  int concurrency = 1;
  int64_t prompt_tokens = 1024;
  int64_t max_tokens = 128;
  int requests = 0;
  int warmup = 1;
  double temperature = 0;
  double timeout_s = 3600;
  std::string label;
  std::string json_path;
  bool progress = true;
};

Options ParseArgs(int argc, char** argv) {
  Options o;
  ArgReader args(argc, argv, "needle-bench", kUsage);
  while (args.Next()) {
    const std::string& arg = args.flag();
    if (arg == "--server") {
      o.server = args.Value();
    } else if (arg == "--concurrency") {
      o.concurrency = args.Number<int>();
    } else if (arg == "--prompt-tokens") {
      o.prompt_tokens = args.Number<int64_t>();
    } else if (arg == "--max-tokens") {
      o.max_tokens = args.Number<int64_t>();
    } else if (arg == "--requests") {
      o.requests = args.Number<int>();
    } else if (arg == "--warmup") {
      o.warmup = args.Number<int>();
    } else if (arg == "--temperature") {
      o.temperature = args.Number<double>();
    } else if (arg == "--timeout-s") {
      o.timeout_s = args.Number<double>();
    } else if (arg == "--label") {
      o.label = args.Value();
    } else if (arg == "--json") {
      o.json_path = args.Value();
    } else if (arg == "--no-progress") {
      o.progress = false;
    } else {
      args.Fail("unknown argument " + arg);
    }
  }
  if (o.concurrency < 1) args.Fail("--concurrency must be >= 1");
  if (o.prompt_tokens < 1) args.Fail("--prompt-tokens must be >= 1");
  if (o.max_tokens < 1) args.Fail("--max-tokens must be >= 1");
  if (o.requests == 0) o.requests = o.concurrency;
  if (o.requests < 1 || o.warmup < 0) args.Fail("--requests must be >= 1 and --warmup >= 0");
  return o;
}

struct Result {
  grpc::Status status;
  std::string finish_reason = "none";
  double ttft_s = -1;
  double start_s = 0;                // when the call started, seconds since the measured phase began
  std::vector<double> client_times;  // seconds since the call started, one per token
  std::vector<double> server_gaps;
  double server_prefill_s = 0, server_queue_s = 0, server_ttft_s = 0;
  int64_t tokens = 0;
};

Result RunOne(needle::v1::Generation::Stub& stub, const Options& o, int index, Clock::time_point epoch) {
  needle::v1::GenerateRequest req;
  SetSyntheticPrompt(&req, o.prompt_tokens, index);
  req.mutable_sampling()->set_temperature(static_cast<float>(o.temperature));
  req.mutable_sampling()->set_seed(static_cast<uint64_t>(index));
  req.mutable_stopping()->set_max_tokens(static_cast<uint32_t>(o.max_tokens));
  req.mutable_stopping()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::duration<double>(o.timeout_s)));
  Result r;
  std::vector<double> server_times;
  const Clock::time_point start = Clock::now();
  r.start_s = std::chrono::duration<double>(start - epoch).count();
  auto reader = stub.Generate(&ctx, req);
  needle::v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    const double now = std::chrono::duration<double>(Clock::now() - start).count();
    if (resp.has_tokens()) {
      for (int i = 0; i < resp.tokens().token_ids_size(); ++i) r.client_times.push_back(now);
      server_times.insert(server_times.end(), resp.tokens().token_times_s().begin(), resp.tokens().token_times_s().end());
    } else if (resp.has_finished()) {
      const auto& f = resp.finished();
      r.finish_reason = ReasonName(f.reason());
      r.server_prefill_s = f.timings().prefill_s();
      r.server_queue_s = f.timings().queue_s();
      r.server_ttft_s = f.timings().first_token_s();
    }
  }
  r.status = reader->Finish();
  r.tokens = static_cast<int64_t>(r.client_times.size());
  if (!r.client_times.empty()) r.ttft_s = r.client_times.front();
  r.server_gaps = Gaps(server_times);
  return r;
}

void Progress(int done, int total, int64_t tokens, double elapsed) {
  const int width = 30, filled = total ? done * width / total : width;
  std::fprintf(stderr, "\r[%s%s] %d/%d requests, %lld tokens, %.1f s", std::string(filled, '=').c_str(),
               std::string(width - filled, ' ').c_str(), done, total, static_cast<long long>(tokens), elapsed);
  std::fflush(stderr);
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = ParseArgs(argc, argv);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 20'000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10'000);
  // Each concurrent stream gets its own channel so HTTP/2 flow control of one doesn't pace another.
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int c = 0; c < o.concurrency; ++c) {
    args.SetInt("needle.bench.channel", c);
    channels.push_back(grpc::CreateCustomChannel(o.server, grpc::InsecureChannelCredentials(), args));
  }
  {
    auto health = grpc::health::v1::Health::NewStub(channels[0]);
    const Clock::time_point until = Clock::now() + std::chrono::minutes(10);
    for (;;) {
      grpc::ClientContext hc;
      hc.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      grpc::health::v1::HealthCheckResponse hr;
      if (health->Check(&hc, {}, &hr).ok() && hr.status() == grpc::health::v1::HealthCheckResponse::SERVING) break;
      if (Clock::now() > until) {
        std::cerr << "needle-bench: " << o.server << " is not serving\n";
        return 1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
  auto stub0 = needle::v1::Generation::NewStub(channels[0]);
  for (int w = 0; w < o.warmup; ++w) {
    Result r = RunOne(*stub0, o, -1 - w, Clock::now());
    if (!r.status.ok()) {
      std::cerr << "needle-bench: warm-up request failed: " << CodeName(r.status.error_code()) << ": "
                << r.status.error_message() << "\n";
      return 1;
    }
  }

  std::mutex mu;
  std::vector<Result> results;
  std::atomic<int> next{0};
  std::atomic<int64_t> tokens{0};
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> workers;
  for (int c = 0; c < o.concurrency; ++c) {
    workers.emplace_back([&, c] {
      auto stub = needle::v1::Generation::NewStub(channels[c]);
      for (int i = next++; i < o.requests; i = next++) {
        Result r = RunOne(*stub, o, i, start);
        tokens += r.tokens;
        std::lock_guard<std::mutex> lock(mu);
        results.push_back(std::move(r));
        if (o.progress) {
          Progress(static_cast<int>(results.size()), o.requests, tokens.load(),
                   std::chrono::duration<double>(Clock::now() - start).count());
        }
      }
    });
  }
  for (auto& t : workers) t.join();
  const double wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  if (o.progress) std::fprintf(stderr, "\n");

  std::vector<double> ttft, itl, server_itl, server_prefill;
  int failed = 0;
  int64_t total_tokens = 0;
  nlohmann::json errors = nlohmann::json::array();
  for (const Result& r : results) {
    if (!r.status.ok()) {
      ++failed;
      errors.push_back({{"code", CodeName(r.status.error_code())}, {"message", r.status.error_message()}});
      continue;
    }
    total_tokens += r.tokens;
    if (r.ttft_s >= 0) ttft.push_back(r.ttft_s);
    for (double g : Gaps(r.client_times)) itl.push_back(g);
    server_itl.insert(server_itl.end(), r.server_gaps.begin(), r.server_gaps.end());
    server_prefill.push_back(r.server_prefill_s);
  }
  // All C decoding: gaps inside [the last first token, the first last token] of one wave of requests.
  std::vector<double> batch_itl;
  if (failed == 0 && o.requests == o.concurrency) {
    double lo = 0, hi = 1e300;
    for (const Result& r : results) {
      if (r.client_times.empty()) continue;
      lo = std::max(lo, r.start_s + r.client_times.front());
      hi = std::min(hi, r.start_s + r.client_times.back());
    }
    for (const Result& r : results) {
      for (size_t i = 1; i < r.client_times.size(); ++i) {
        if (r.start_s + r.client_times[i - 1] >= lo && r.start_s + r.client_times[i] <= hi) {
          batch_itl.push_back(r.client_times[i] - r.client_times[i - 1]);
        }
      }
    }
  }
  const Summary s_ttft = Summarize(ttft), s_itl = Summarize(itl), s_sitl = Summarize(server_itl),
                s_prefill = Summarize(server_prefill), s_batch = Summarize(batch_itl);
  std::printf("needle-bench: %s  C=%d L=%lld O=%lld requests=%d (failed %d)  wall %.2f s\n", o.server.c_str(),
              o.concurrency, static_cast<long long>(o.prompt_tokens), static_cast<long long>(o.max_tokens),
              o.requests, failed, wall_s);
  std::printf("%-26s %10s %10s %10s %10s %10s\n", "(ms)", "mean", "p50", "p90", "p99", "max");
  auto row = [](const char* name, const Summary& s) {
    std::printf("%-26s %10.3f %10.3f %10.3f %10.3f %10.3f\n", name, s.mean * 1e3, s.p50 * 1e3, s.p90 * 1e3,
                s.p99 * 1e3, s.max * 1e3);
  };
  row("time to first token", s_ttft);
  row("per-token latency", s_itl);
  row("per-token (server)", s_sitl);
  row("prefill (server)", s_prefill);
  if (s_batch.n > 0) {
    row("per-token, all C decoding", s_batch);
    std::printf("(all C decoding: %zu gaps)\n", s_batch.n);
  }
  std::printf("output tokens/s %.1f   requests/s %.3f\n", total_tokens / wall_s, (o.requests - failed) / wall_s);

  if (!o.json_path.empty()) {
    nlohmann::json j;
    j["server"] = o.server;
    j["label"] = o.label;
    j["concurrency"] = o.concurrency;
    j["prompt_tokens"] = o.prompt_tokens;
    j["max_tokens"] = o.max_tokens;
    j["requests"] = o.requests;
    j["failed"] = failed;
    j["errors"] = errors;
    j["wall_s"] = wall_s;
    j["output_tokens"] = total_tokens;
    j["output_tokens_per_s"] = total_tokens / wall_s;
    j["time_to_first_token"] = SummaryJson(s_ttft);
    j["per_token_latency"] = SummaryJson(s_itl);
    j["per_token_latency_server"] = SummaryJson(s_sitl);
    j["prefill_server"] = SummaryJson(s_prefill);
    j["per_token_latency_all_decoding"] = SummaryJson(s_batch);
    std::ofstream(o.json_path) << j.dump(2) << "\n";
  }
  return failed ? 1 : 0;
}
