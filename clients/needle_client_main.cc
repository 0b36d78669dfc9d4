// needle-client: one streaming completion over gRPC, for people and for scripts. Streams the text to
// stdout as it arrives, then prints (to stderr) time to first token and inter-token latency measured
// here next to the server's own timings; --json prints one JSON object instead. Depends only on the
// generated API (needle_proto), never on the engine.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "needle/v1/generation.grpc.pb.h"
#include "clients/client_common.h"
#include "nlohmann/json.hpp"

namespace {

using namespace needle::clients;  // NOLINT: Summary, Summarize, Gaps, ReasonName, CodeName

using Clock = std::chrono::steady_clock;
using needle::v1::GenerateRequest;
using needle::v1::GenerateResponse;

constexpr char kUsage[] = R"(usage: needle-client [options]
Sends one Generate request and streams the completion to stdout.

  --server HOST:PORT     server address (default 127.0.0.1:50051)
  --prompt TEXT          the prompt as text
  --prompt-file FILE     the prompt as the text of FILE
  --prompt-tokens N      a synthetic prompt of N token ids (cycling over the printable bytes 32..126)
  --max-tokens N         generated tokens at most (default: until EOS or the context is full)
  --temperature T        0 = greedy (server default 1.0)
  --top-p P, --top-k K, --seed S
  --ignore-eos           keep generating past EOS
  --stop STRING          stop string (repeatable)
  --request-id ID        request id (default: the server assigns one)
  --timeout-s SECONDS    call deadline
  --wait-ready-s SECONDS wait until the server's health is SERVING (model loaded and warm)
  --json                 print one JSON object (ids, text, finish reason, timings) instead of text
  --help
Exit status: 0 when the call ends OK, 1 on a gRPC error, 2 on bad usage.
)";

struct Options {
  std::string server = "127.0.0.1:50051";
  std::optional<std::string> prompt;
  std::optional<std::string> prompt_file;
  std::optional<long> prompt_tokens;
  std::optional<long> max_tokens;
  std::optional<double> temperature;
  std::optional<double> top_p;
  std::optional<long> top_k;
  std::optional<unsigned long long> seed;
  bool ignore_eos = false;
  std::vector<std::string> stop;
  std::string request_id;
  std::optional<double> timeout_s;
  double wait_ready_s = 0;  // poll grpc.health.v1 until SERVING for up to this long
  bool json = false;
};

[[noreturn]] void UsageError(const std::string& message) {
  std::cerr << "needle-client: " << message << "\n\n" << kUsage;
  std::exit(2);
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  ArgReader args(argc, argv, "needle-client", kUsage);
  while (args.Next()) {
    const std::string& arg = args.flag();
    if (arg == "--server") {
      o.server = args.Value();
    } else if (arg == "--prompt") {
      o.prompt = args.Value();
    } else if (arg == "--prompt-file") {
      o.prompt_file = args.Value();
    } else if (arg == "--prompt-tokens") {
      o.prompt_tokens = args.Number<long>();
    } else if (arg == "--max-tokens") {
      o.max_tokens = args.Number<long>();
    } else if (arg == "--temperature") {
      o.temperature = args.Number<double>();
    } else if (arg == "--top-p") {
      o.top_p = args.Number<double>();
    } else if (arg == "--top-k") {
      o.top_k = args.Number<long>();
    } else if (arg == "--seed") {
      o.seed = args.Number<unsigned long long>();
    } else if (arg == "--ignore-eos") {
      o.ignore_eos = true;
    } else if (arg == "--stop") {
      o.stop.push_back(args.Value());
    } else if (arg == "--request-id") {
      o.request_id = args.Value();
    } else if (arg == "--timeout-s") {
      o.timeout_s = args.Number<double>();
    } else if (arg == "--wait-ready-s") {
      o.wait_ready_s = args.Number<double>();
    } else if (arg == "--json") {
      o.json = true;
    } else {
      args.Fail("unknown argument \"" + arg + "\"");
    }
  }
  const int inputs = (o.prompt ? 1 : 0) + (o.prompt_file ? 1 : 0) + (o.prompt_tokens ? 1 : 0);
  if (inputs != 1) args.Fail("give exactly one of --prompt, --prompt-file, --prompt-tokens");
  if (o.prompt_tokens && *o.prompt_tokens < 1) args.Fail("--prompt-tokens must be >= 1");
  if (o.max_tokens && (*o.max_tokens < 0 || *o.max_tokens > 0xffffffffl)) args.Fail("--max-tokens out of range");
  if (o.top_k && (*o.top_k < 0 || *o.top_k > 0xffffffffl)) args.Fail("--top-k out of range");
  if (o.timeout_s && !(*o.timeout_s > 0)) args.Fail("--timeout-s must be > 0");
  return o;
}

GenerateRequest BuildRequest(const Options& o) {
  GenerateRequest req;
  req.set_request_id(o.request_id);
  if (o.prompt) {
    req.set_text(*o.prompt);
  } else if (o.prompt_file) {
    std::ifstream in(*o.prompt_file, std::ios::binary);
    if (!in) UsageError("cannot read " + *o.prompt_file);
    std::ostringstream text;
    text << in.rdbuf();
    req.set_text(text.str());
  } else {
    SetSyntheticPrompt(&req, *o.prompt_tokens, 0);
  }
  auto* s = req.mutable_sampling();
  if (o.temperature) s->set_temperature(static_cast<float>(*o.temperature));
  if (o.top_p) s->set_top_p(static_cast<float>(*o.top_p));
  if (o.top_k) s->set_top_k(static_cast<uint32_t>(*o.top_k));
  if (o.seed) s->set_seed(*o.seed);
  auto* st = req.mutable_stopping();
  if (o.max_tokens) st->set_max_tokens(static_cast<uint32_t>(*o.max_tokens));
  for (const std::string& stop : o.stop) st->add_stop(stop);
  st->set_ignore_eos(o.ignore_eos);
  return req;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = ParseArgs(argc, argv);
  const GenerateRequest request = BuildRequest(options);

  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Long prefills send nothing for seconds: keep the connection alive (the server permits this rate).
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 20'000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10'000);
  auto channel = grpc::CreateCustomChannel(options.server, grpc::InsecureChannelCredentials(), args);
  auto stub = needle::v1::Generation::NewStub(channel);
  if (options.wait_ready_s > 0) {
    // The server answers health NOT_SERVING until its engine is built and warm.
    auto health = grpc::health::v1::Health::NewStub(channel);
    const Clock::time_point until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                       std::chrono::duration<double>(options.wait_ready_s));
    for (;;) {
      grpc::ClientContext hc;
      hc.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      grpc::health::v1::HealthCheckResponse hr;
      grpc::Status hs = health->Check(&hc, grpc::health::v1::HealthCheckRequest(), &hr);
      if (hs.ok() && hr.status() == grpc::health::v1::HealthCheckResponse::SERVING) break;
      if (Clock::now() >= until) {
        std::cerr << "needle-client: the server at " << options.server << " is not serving after "
                  << options.wait_ready_s << " s\n";
        return 1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  grpc::ClientContext context;
  if (options.timeout_s) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::duration_cast<std::chrono::system_clock::duration>(
                             std::chrono::duration<double>(*options.timeout_s)));
  }
  const Clock::time_point start = Clock::now();
  std::unique_ptr<grpc::ClientReader<GenerateResponse>> reader = stub->Generate(&context, request);

  std::string request_id;
  std::vector<uint32_t> ids;
  std::string text;
  std::vector<double> client_times;  // per token: seconds since the call started, at arrival
  std::optional<needle::v1::Finished> finished;
  GenerateResponse response;
  while (reader->Read(&response)) {
    const double now = std::chrono::duration<double>(Clock::now() - start).count();
    request_id = response.request_id();
    if (response.has_tokens()) {
      const auto& chunk = response.tokens();
      for (uint32_t id : chunk.token_ids()) {
        ids.push_back(id);
        client_times.push_back(now);
      }
      text += chunk.text();
      if (!options.json) {
        std::fwrite(chunk.text().data(), 1, chunk.text().size(), stdout);
        std::fflush(stdout);
      }
    } else if (response.has_finished()) {
      finished = response.finished();
    }
  }
  const grpc::Status status = reader->Finish();
  const double total_s = std::chrono::duration<double>(Clock::now() - start).count();

  std::vector<double> server_times;
  if (finished) server_times.assign(finished->timings().token_times_s().begin(), finished->timings().token_times_s().end());
  const Summary client_itl = Summarize(Gaps(client_times));
  const Summary server_itl = Summarize(Gaps(server_times));
  const double client_ttft = client_times.empty() ? 0 : client_times.front();

  if (options.json) {
    nlohmann::json out;
    out["request_id"] = request_id;
    out["status"] = {{"code", CodeName(status.error_code())}, {"message", status.error_message()}};
    out["token_ids"] = ids;
    // The server sends only complete UTF-8; the dump replaces anything else rather than throw.
    out["text"] = text;
    out["finish_reason"] = finished ? ReasonName(finished->reason()) : "none";
    out["matched_stop"] = finished ? finished->matched_stop() : "";
    if (finished) {
      out["usage"] = {{"prompt_tokens", finished->usage().prompt_tokens()},
                      {"completion_tokens", finished->usage().completion_tokens()}};
      const auto& t = finished->timings();
      out["server"] = {{"queue_s", t.queue_s()},       {"prefill_s", t.prefill_s()},
                       {"first_token_s", t.first_token_s()}, {"decode_s", t.decode_s()},
                       {"inter_token", SummaryJson(server_itl)}};
    }
    out["client"] = {{"first_token_s", client_ttft}, {"total_s", total_s}, {"inter_token", SummaryJson(client_itl)}};
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  } else {
    std::fputc('\n', stdout);
    std::fflush(stdout);
    std::fprintf(stderr, "\nrequest %s: %zu tokens, finish reason %s%s%s\n", request_id.c_str(), ids.size(),
                 finished ? ReasonName(finished->reason()) : "none",
                 finished && !finished->matched_stop().empty() ? ", matched " : "",
                 finished ? finished->matched_stop().c_str() : "");
    std::fprintf(stderr, "%-22s %12s %12s\n", "", "client (ms)", "server (ms)");
    std::fprintf(stderr, "%-22s %12.2f %12.2f\n", "time to first token", client_ttft * 1e3,
                 finished ? finished->timings().first_token_s() * 1e3 : 0.0);
    const std::pair<const char*, double Summary::*> rows[] = {{"inter-token mean", &Summary::mean},
                                                              {"inter-token p50", &Summary::p50},
                                                              {"inter-token p90", &Summary::p90},
                                                              {"inter-token p99", &Summary::p99},
                                                              {"inter-token max", &Summary::max}};
    for (const auto& [name, field] : rows) {
      std::fprintf(stderr, "%-22s %12.2f %12.2f\n", name, client_itl.*field * 1e3, server_itl.*field * 1e3);
    }
    if (finished) {
      std::fprintf(stderr, "server: queue %.2f ms, prefill %.2f ms, decode %.2f ms; client total %.2f ms\n",
                   finished->timings().queue_s() * 1e3, finished->timings().prefill_s() * 1e3,
                   finished->timings().decode_s() * 1e3, total_s * 1e3);
    }
  }
  if (!status.ok()) {
    std::fprintf(stderr, "needle-client: %s: %s\n", CodeName(status.error_code()),
                 status.error_message().c_str());
    return 1;
  }
  return 0;
}
