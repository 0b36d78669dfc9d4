#include "server/metrics_http.h"

#include <atomic>
#include <chrono>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "httplib.h"

namespace needle::server {

struct MetricsHttpServer::Impl {
  httplib::Server http;
  std::atomic<bool> done{false};  // listen_after_bind returned
};

MetricsHttpServer::MetricsHttpServer() : impl_(std::make_unique<Impl>()) {}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(const std::string& listen,
                                                                          std::function<std::string()> render) {
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics_listen must be host:port, got \"", listen, "\""));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);

  std::unique_ptr<MetricsHttpServer> s(new MetricsHttpServer());
  httplib::Server& http = s->impl_->http;
  // Scrapes come seconds apart: one worker thread (the library's default pool has one per core).
  http.new_task_queue = [] { return new httplib::ThreadPool(1); };
  http.Get("/metrics", [render = std::move(render)](const httplib::Request&, httplib::Response& res) {
    res.set_content(render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  const int bound = port == 0 ? http.bind_to_any_port(host) : (http.bind_to_port(host, port) ? port : -1);
  if (bound <= 0) return absl::UnavailableError(absl::StrCat("cannot listen for metrics on ", listen));
  s->address_ = absl::StrCat(listen.substr(0, colon), ":", bound);
  s->thread_ = std::thread([impl = s->impl_.get()] {
    impl->http.listen_after_bind();
    impl->done = true;
  });
  // Stop() only interrupts a server that is running: wait until it is.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!http.is_running() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!http.is_running()) {
    s->Stop();
    return absl::InternalError(absl::StrCat("the metrics server on ", s->address_, " did not start"));
  }
  return s;
}

void MetricsHttpServer::Stop() {
  if (!thread_.joinable()) return;
  // stop() only interrupts a server already listening (and must not run twice on one): wait for the
  // listening to start, or for the thread to have returned without it.
  while (!impl_->done) {
    if (impl_->http.is_running()) {
      impl_->http.stop();
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  thread_.join();
}

}  // namespace needle::server
