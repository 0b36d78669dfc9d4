// MetricsHttpServer: a small HTTP/1.1 server (cpp-httplib, one worker thread) for Prometheus to
// scrape: GET /metrics returns the text from the render callback (RenderMetrics), anything else 404.
// Separate from the gRPC port, as in other inference servers (a scraper speaks plain HTTP).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace needle::server {

class MetricsHttpServer {
 public:
  // Binds `listen` ("host:port"; port 0 picks a free one; "[::1]:port" for IPv6) and serves from a
  // thread of its own. `render` runs on that thread for every scrape.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& listen,
                                                                 std::function<std::string()> render);
  ~MetricsHttpServer();  // Stop()s

  // The address bound, "host:port".
  const std::string& address() const { return address_; }
  // Stops accepting and joins the thread; idempotent.
  void Stop();

 private:
  struct Impl;  // the httplib server (its header stays out of this one)
  MetricsHttpServer();

  std::unique_ptr<Impl> impl_;
  std::string address_;
  std::thread thread_;
};

}  // namespace needle::server
