// NeedleServer: assembles and runs the gRPC server around one engine, and owns its lifecycle:
// Start() binds the port and serves health (NOT_SERVING) and reflection at once; LoadEngine() builds
// the engine, pushes one warm-up request through it and only then reports SERVING; Shutdown()
// drains (NOT_SERVING, new requests UNAVAILABLE, in-flight ones run to completion within the grace
// period, the rest are cancelled) and stops gRPC and the engine in the order that keeps every
// reactor's engine pointer valid. A monitor thread turns health NOT_SERVING if the engine fails.
// With metrics_listen set, Start() also serves Prometheus metrics over HTTP (server/metrics.h) until
// Shutdown() ends.
// Flags and logging sinks belong to main.cc, not here.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/builder.h"
#include "grpcpp/grpcpp.h"
#include "server/generation_service.h"
#include "server/health_service.h"
#include "server/metrics_http.h"

namespace needle::server {

struct ServerOptions {
  std::string listen = "127.0.0.1:50051";  // host:port; port 0 picks a free one
  double grace_period_s = 30;              // how long Shutdown() lets in-flight requests finish
  int64_t max_buffered_tokens = 8192;      // slow-reader bound per stream (server/response_queue.h)
  int max_message_bytes = 64 << 20;        // largest request accepted (a 128k-token prompt is ~0.7 MB)
  std::string metrics_listen;              // host:port of GET /metrics (port 0: a free one); empty: none
  engine::EngineOptions engine;

  absl::Status Validate() const;
  // Every setting on one line, for the start-up log.
  std::string ToString() const;
};

class NeedleServer {
 public:
  static absl::StatusOr<std::unique_ptr<NeedleServer>> Start(const ServerOptions& options);
  ~NeedleServer();  // Shutdown()s if still running

  // The address actually bound, "host:port" (the port resolved when 0 was asked for).
  const std::string& address() const { return address_; }
  int port() const { return port_; }
  // The metrics endpoint's "host:port", empty without metrics_listen.
  std::string metrics_address() const { return metrics_ ? metrics_->address() : std::string(); }

  // Builds the engine, runs a warm-up request, then starts serving Generation and reports SERVING.
  absl::Status LoadEngine();
  // Drains and stops; idempotent.
  void Shutdown();

 private:
  explicit NeedleServer(const ServerOptions& options);
  // Watches the engine: after an executor failure it refuses new work, and health goes NOT_SERVING.
  void MonitorEngine();

  const ServerOptions options_;
  std::string address_;
  int port_ = 0;
  std::unique_ptr<HealthService> health_;
  std::unique_ptr<GenerationService> generation_;
  std::unique_ptr<engine::Engine> engine_;  // outlives server_ (reactors hold raw pointers)
  std::unique_ptr<grpc::Server> server_;
  std::atomic<engine::Engine*> metrics_engine_{nullptr};  // what /metrics reports; set once warm
  std::unique_ptr<MetricsHttpServer> metrics_;
  bool shut_down_ = false;

  std::mutex monitor_mu_;
  std::condition_variable monitor_cv_;
  bool monitor_stop_ = false;  // guarded by monitor_mu_
  std::thread monitor_;
};

}  // namespace needle::server
