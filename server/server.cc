// The server's assembly and lifecycle. See server.h.
#include "server/server.h"

#include <chrono>
#include <exception>
#include <future>
#include <new>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "server/log.h"
#include "server/metrics.h"
#include "spdlog/spdlog.h"

namespace needle::server {
namespace {

// Clients may ping this often while a long prefill sends nothing (a 64k prompt takes seconds).
constexpr int kMinClientPingIntervalMs = 10'000;
// The server pings idle connections to notice clients that vanished without closing.
constexpr int kKeepaliveTimeMs = 60'000;
constexpr int kKeepaliveTimeoutMs = 20'000;
constexpr double kWarmupTimeoutS = 600;

// The host part of "host:port" ("[::1]:0" -> "[::1]").
std::string HostOf(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  return colon == std::string::npos ? listen : listen.substr(0, colon);
}

// One short greedy request straight through the engine: the first step allocates and touches
// everything, so the first client does not pay for it, and a broken build fails here, not later.
absl::Status WarmUp(engine::Engine& engine) {
  engine::Request req;
  req.id = "warmup";
  const engine::ModelConfig& m = engine.model();
  for (int i = 0; i < 8; ++i) req.prompt.push_back(('a' + i) % m.vocab_size);
  req.sampling.temperature = 0;
  req.stopping.max_tokens = 2;
  req.stopping.ignore_eos = true;
  auto done = std::make_shared<std::promise<engine::RequestEvent>>();
  std::future<engine::RequestEvent> finished = done->get_future();
  absl::StatusOr<std::string> id = engine.Submit(std::move(req), [done](engine::RequestEvent&& e) {
    if (e.kind == engine::RequestEvent::Kind::kFinished) done->set_value(std::move(e));
  });
  if (!id.ok()) return id.status();
  if (finished.wait_for(std::chrono::duration<double>(kWarmupTimeoutS)) != std::future_status::ready) {
    engine.Cancel(*id);
    return absl::DeadlineExceededError(absl::StrCat("warm-up took more than ", kWarmupTimeoutS, " s"));
  }
  engine::RequestEvent e = finished.get();
  if (e.reason != engine::FinishReason::kLength) {
    return absl::InternalError(absl::StrCat("warm-up ended with ", engine::FinishReasonName(e.reason), ": ",
                                            e.status.ToString()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ServerOptions::Validate() const {
  if (listen.empty() || listen.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("--listen must be host:port, got \"", listen, "\""));
  }
  if (!(grace_period_s >= 0)) return absl::InvalidArgumentError("--grace_period_s must be >= 0");
  if (max_buffered_tokens < 1) return absl::InvalidArgumentError("--max_buffered_tokens must be >= 1");
  if (max_message_bytes < 1024) return absl::InvalidArgumentError("max_message_bytes must be >= 1024");
  if (!metrics_listen.empty() && metrics_listen.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics_listen must be host:port, got \"", metrics_listen, "\""));
  }
  return engine.Validate();
}

std::string ServerOptions::ToString() const {
  const engine::EngineConfig& e = engine.engine;
  return absl::StrFormat(
      "listen=%s metrics_listen=%s grace_period_s=%g max_buffered_tokens=%d max_message_bytes=%d model=%s "
      "model_seed=%d backend=%s kv_cache_bytes=%d page_tokens=%d max_seq_tokens=%d max_batch=%d prefill_chunk=%d "
      "step_token_budget=%d max_queue=%d seed=%d",
      listen, metrics_listen.empty() ? "(none)" : metrics_listen, grace_period_s, max_buffered_tokens,
      max_message_bytes, engine.model, engine.model_seed, engine.backend,
      engine.kv_cache_bytes, engine.page_tokens, engine.max_seq_tokens, e.max_batch, e.prefill_chunk,
      e.step_token_budget, e.max_queue, e.seed);
}

NeedleServer::NeedleServer(const ServerOptions& options) : options_(options) {}

absl::StatusOr<std::unique_ptr<NeedleServer>> NeedleServer::Start(const ServerOptions& options) {
  if (absl::Status s = options.Validate(); !s.ok()) return s;
  std::unique_ptr<NeedleServer> s(new NeedleServer(options));
  s->health_ = std::make_unique<HealthService>();
  s->generation_ = std::make_unique<GenerationService>(
      ServiceInfo{options.engine.model, options.engine.backend, StreamOptions{options.max_buffered_tokens}});

  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &s->port_);
  builder.RegisterService(s->health_.get());
  builder.RegisterService(s->generation_.get());
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, kMinClientPingIntervalMs);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, kKeepaliveTimeMs);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, kKeepaliveTimeoutMs);
  s->server_ = builder.BuildAndStart();
  if (!s->server_ || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  s->address_ = absl::StrCat(HostOf(options.listen), ":", s->port_);
  Log()->info("listening on {} (health NOT_SERVING until the engine is warm)", s->address_);
  if (!options.metrics_listen.empty()) {
    const MetricsInfo info{options.engine.model, options.engine.backend};
    NeedleServer* self = s.get();
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> metrics =
        MetricsHttpServer::Start(options.metrics_listen, [info, self] {
          engine::Engine* e = self->metrics_engine_.load(std::memory_order_acquire);
          if (e == nullptr) return RenderMetrics(info, nullptr);
          const engine::EngineStats stats = e->Stats();
          return RenderMetrics(info, &stats);
        });
    if (!metrics.ok()) return metrics.status();  // ~NeedleServer shuts gRPC down
    s->metrics_ = *std::move(metrics);
    Log()->info("metrics on http://{}/metrics", s->metrics_->address());
  }
  return s;
}

NeedleServer::~NeedleServer() { Shutdown(); }

absl::Status NeedleServer::LoadEngine() {
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<engine::Engine>> built;
  // A model whose configuration asks for more memory than there is (e.g. a context of 2^31 tokens
  // sizes the KV cache for one whole sequence) throws std::bad_alloc while building: report it as a
  // start-up error like any other, rather than terminating.
  try {
    built = engine::BuildEngine(options_.engine);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat("out of memory while building the engine for ",
                                                     options_.engine.model, " (check its config.json, "
                                                     "e.g. max_position_embeddings, and --kv_cache_bytes)"));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("building the engine for ", options_.engine.model, " failed: ", e.what()));
  }
  if (!built.ok()) return built.status();
  engine_ = *std::move(built);
  const auto t1 = std::chrono::steady_clock::now();
  if (absl::Status s = WarmUp(*engine_); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("warm-up request failed: ", s.message()));
  }
  const auto t2 = std::chrono::steady_clock::now();
  const engine::ModelConfig& m = engine_->model();
  Log()->info("engine ready: model {} ({}, vocab {}, context {}), built in {:.2f} s, warm-up {:.2f} s",
              options_.engine.model, std::string(engine::ArchitectureName(m.arch)), m.vocab_size, m.max_position_embeddings,
              std::chrono::duration<double>(t1 - t0).count(), std::chrono::duration<double>(t2 - t1).count());
  {
    // What the KV budget bought, pool by pool (a request is admitted when every pool has room for
    // its prompt plus max_tokens).
    const engine::KvCacheConfig& kv = engine_->cache_config();
    std::string pools;
    for (int p = 0; p < engine::kNumPools; ++p) {
      if (kv.num_pages[p] == 0) continue;
      const auto pool = static_cast<engine::Pool>(p);
      absl::StrAppend(&pools, pools.empty() ? "" : ", ", engine::PoolName(pool), " ", kv.num_pages[p],
                      pool == engine::Pool::kStaging ? " slots" : " pages");
    }
    Log()->info("KV cache: {} (pages of {} tokens, compressed pages of {})", pools, kv.page_tokens,
                kv.cmp_page_tokens);
  }
  generation_->SetEngine(engine_.get());
  metrics_engine_.store(engine_.get(), std::memory_order_release);
  health_->SetServing(true);
  monitor_ = std::thread([this] { MonitorEngine(); });
  return absl::OkStatus();
}

void NeedleServer::MonitorEngine() {
  std::unique_lock<std::mutex> lock(monitor_mu_);
  while (!monitor_cv_.wait_for(lock, std::chrono::milliseconds(250), [this] { return monitor_stop_; })) {
    if (!engine_->Stats().healthy) {
      Log()->error("the engine reported a failure: health is NOT_SERVING");
      health_->SetServing(false);
      return;
    }
  }
}

void NeedleServer::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  // Refuse new requests before health says NOT_SERVING, so that a client that saw NOT_SERVING is
  // never served (the other order left a window in which such a request was still accepted).
  if (engine_) engine_->Drain();
  health_->SetServing(false);
  if (monitor_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(monitor_mu_);
      monitor_stop_ = true;
    }
    monitor_cv_.notify_all();
    monitor_.join();
  }
  if (engine_) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(options_.grace_period_s);
    Log()->info("draining: waiting up to {} s for in-flight requests", options_.grace_period_s);
    while (!engine_->Idle() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (!engine_->Idle()) Log()->warn("grace period over: cancelling the requests still in flight");
    // Ends whatever is still live (their streams finish with UNAVAILABLE) and joins the engine thread;
    // the engine object stays alive until gRPC is done with every reactor.
    engine_->Stop();
    Log()->debug("engine stopped");
  }
  health_->Shutdown();
  // Every stream has its final event by now. gRPC 1.51 also waits for idle client connections to
  // go away (seconds), so the deadline is short: it only has to cover the streams' last writes.
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  Log()->debug("gRPC shut down");
  server_->Wait();
  // Last, so that a scrape during the drain still answers (the engine object lives on).
  if (metrics_) metrics_->Stop();
  Log()->info("stopped");
}

}  // namespace needle::server
