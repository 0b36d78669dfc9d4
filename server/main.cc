// needle-server: parses flags, configures logging sinks, starts the gRPC server, loads the engine
// and waits for SIGINT/SIGTERM, then drains and exits 0. Prints "needle-server listening on
// HOST:PORT" on stdout once the port is bound (tests start it on port 0 and read the line), after
// "needle-server metrics on http://HOST:PORT/metrics" when --metrics_listen is set. The lifecycle
// itself lives in server/server.cc.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "server/server.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

ABSL_FLAG(std::string, model, "demo", "preset name (demo, tiny-nsa-paper, ...) or checkpoint directory");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "host:port to serve on; port 0 picks a free port");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port of an HTTP endpoint serving Prometheus metrics on GET /metrics (e.g. 0.0.0.0:9400; port 0 "
          "picks a free port); empty: no metrics endpoint");
ABSL_FLAG(std::string, backend, "cpu", "executor: cpu, cuda or auto");
ABSL_FLAG(int, max_batch, 32, "running sequences at most");
ABSL_FLAG(int, prefill_chunk, 512, "prompt tokens per sequence per engine step at most");
ABSL_FLAG(int, step_token_budget, 2048, "tokens per engine step at most (decodes count one each)");
ABSL_FLAG(int64_t, kv_cache_bytes, 256ll << 20, "bytes of all KV cache pools together");
ABSL_FLAG(double, kv_cache_fraction, 0,
          "cuda: size the KV pools as this fraction of the device memory left after weights and buffers "
          "(0: use --kv_cache_bytes)");
ABSL_FLAG(int64_t, max_seq_tokens, 0,
          "longest sequence (prompt + output) the KV pools are sized for; 0: the model's context. "
          "One such sequence must fit in the KV budget");
ABSL_FLAG(bool, cuda_graphs, true,
          "cuda backend: replay pure-decode steps from CUDA graphs captured per batch bucket; false runs every "
          "step launch by launch");
ABSL_FLAG(int, max_queue, 1024, "waiting requests at most; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(std::string, log_level, "info", "trace, debug, info, warn, error or off");
ABSL_FLAG(double, grace_period_s, 30, "on SIGINT/SIGTERM, seconds in-flight requests may take to finish");
ABSL_FLAG(uint64_t, model_seed, 0, "seed of a synthetic preset's weights");
ABSL_FLAG(uint64_t, seed, 0, "seeds the sampling of requests that set no seed");
ABSL_FLAG(int64_t, max_buffered_tokens, 8192,
          "per stream: generated tokens waiting for a slow client at most; beyond, the request is "
          "cancelled with RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_message_bytes, 64 << 20,
          "largest request message accepted, in bytes (>= 1024); larger ones get RESOURCE_EXHAUSTED from gRPC");

namespace {

// Sinks are configured here only: one stderr sink shared by the subsystem loggers.
void ConfigureLogging(const std::string& level_name) {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  const spdlog::level::level_enum level = spdlog::level::from_str(level_name);
  for (const char* name : {"server", "engine"}) {
    auto logger = std::make_shared<spdlog::logger>(name, sink);
    logger->set_level(level);
    spdlog::register_logger(logger);
  }
  auto fallback = std::make_shared<spdlog::logger>("needle", sink);
  fallback->set_level(level);
  spdlog::set_default_logger(fallback);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("needle-server: gRPC inference server for Native Sparse Attention models");
  absl::ParseCommandLine(argc, argv);
#ifdef NEEDLE_HAVE_CUDA
  needle::engine::cuda::CudaBackendOptions cuda_options;
  cuda_options.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  needle::engine::cuda::RegisterCudaBackend(cuda_options);
#endif

  const std::string level = absl::GetFlag(FLAGS_log_level);
  if (spdlog::level::from_str(level) == spdlog::level::off && level != "off") {
    std::fprintf(stderr, "needle-server: --log_level must be trace, debug, info, warn, error or off\n");
    return 2;
  }
  ConfigureLogging(level);
  auto log = spdlog::get("server");

  // Block the shutdown signals in every thread (gRPC's and the engine's inherit the mask); the main
  // thread takes them with sigwait once the server runs.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  needle::server::ServerOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.grace_period_s = absl::GetFlag(FLAGS_grace_period_s);
  options.max_buffered_tokens = absl::GetFlag(FLAGS_max_buffered_tokens);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.engine.model = absl::GetFlag(FLAGS_model);
  options.engine.model_seed = absl::GetFlag(FLAGS_model_seed);
  options.engine.backend = absl::GetFlag(FLAGS_backend);
  options.engine.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_bytes);
  options.engine.kv_cache_fraction = absl::GetFlag(FLAGS_kv_cache_fraction);
  options.engine.max_seq_tokens = absl::GetFlag(FLAGS_max_seq_tokens);
  options.engine.engine.max_batch = absl::GetFlag(FLAGS_max_batch);
  options.engine.engine.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  options.engine.engine.step_token_budget = absl::GetFlag(FLAGS_step_token_budget);
  options.engine.engine.max_queue = absl::GetFlag(FLAGS_max_queue);
  options.engine.engine.seed = absl::GetFlag(FLAGS_seed);
  if (absl::Status s = options.Validate(); !s.ok()) {
    log->error("invalid configuration: {}", s.ToString());
    return 2;
  }
  log->info("config: {}", options.ToString());

  auto server = needle::server::NeedleServer::Start(options);
  if (!server.ok()) {
    log->error("{}", server.status().ToString());
    return 1;
  }
  if (!(*server)->metrics_address().empty()) {
    std::printf("needle-server metrics on http://%s/metrics\n", (*server)->metrics_address().c_str());
  }
  std::printf("needle-server listening on %s\n", (*server)->address().c_str());
  std::fflush(stdout);

  // A signal during the (blocking) engine build stays pending and is taken right after it.
  if (absl::Status s = (*server)->LoadEngine(); !s.ok()) {
    log->error("cannot start the engine: {}", s.ToString());
    (*server)->Shutdown();
    return 1;
  }

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  log->info("received {}: draining", signal_number == SIGINT ? "SIGINT" : "SIGTERM");
  (*server)->Shutdown();
  return 0;
}
