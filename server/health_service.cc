// grpc.health.v1.Health: Check answers from the current status; each Watch is a reactor that sends
// the status at once and then every change, keeping at most one write in flight and only the latest
// status pending. See health_service.h.
#include "server/health_service.h"

#include <vector>

#include "spdlog/spdlog.h"

namespace needle::server {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

class HealthService::Watcher final : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  Watcher(HealthService* service, std::string name) : service_(service), name_(std::move(name)) {}

  const std::string& name() const { return name_; }

  // Queues `status` (replacing one not yet sent) and starts a write if none is in flight.
  void Send(ServingStatus status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      if (have_sent_ && !writing_ && status == last_sent_) return;
      pending_ = status;
      has_pending_ = true;
      if (writing_) return;
      StartLocked();
    }
    StartWrite(&response_);
  }

  void End(grpc::Status status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
      if (writing_) {  // finish after the write completes
        end_status_ = std::move(status);
        end_after_write_ = true;
        return;
      }
    }
    Finish(status);
  }

  void OnWriteDone(bool ok) override {
    bool write = false;
    bool finish = false;
    grpc::Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (end_after_write_) {
        end_after_write_ = false;
        finish = true;
        status = end_status_;
      } else if (!ok) {
        if (!finished_) {
          finished_ = true;
          finish = true;
          status = grpc::Status(grpc::StatusCode::CANCELLED, "the watch was cancelled");
        }
      } else if (has_pending_ && pending_ != last_sent_ && !finished_) {
        StartLocked();
        write = true;
      }
    }
    if (write) StartWrite(&response_);
    if (finish) Finish(status);
  }

  void OnCancel() override { End(grpc::Status(grpc::StatusCode::CANCELLED, "the watch was cancelled")); }

  void OnDone() override {
    service_->Remove(this);
    delete this;
  }

 private:
  void StartLocked() {
    response_.set_status(pending_);
    last_sent_ = pending_;
    have_sent_ = true;
    has_pending_ = false;
    writing_ = true;
  }

  HealthService* const service_;
  const std::string name_;
  std::mutex mu_;
  HealthCheckResponse response_;
  ServingStatus pending_ = HealthCheckResponse::UNKNOWN;
  ServingStatus last_sent_ = HealthCheckResponse::UNKNOWN;
  bool has_pending_ = false;
  bool have_sent_ = false;
  bool writing_ = false;
  bool finished_ = false;
  bool end_after_write_ = false;
  grpc::Status end_status_;
};

HealthService::~HealthService() = default;

bool HealthService::Known(const std::string& service) {
  return service.empty() || service == "needle.v1.Generation";
}

HealthService::ServingStatus HealthService::StatusLocked(const std::string& service) const {
  if (!Known(service)) return HealthCheckResponse::SERVICE_UNKNOWN;
  return serving_ ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
}

void HealthService::SetServing(bool serving) {
  std::lock_guard<std::mutex> lock(mu_);
  if (shut_down_ || serving_ == serving) return;
  serving_ = serving;
  // Send() only locks the watcher and starts a write, so holding mu_ here keeps a watcher from
  // being removed (and deleted) while it is notified.
  for (Watcher* w : watchers_) w->Send(StatusLocked(w->name()));
}

bool HealthService::serving() const {
  std::lock_guard<std::mutex> lock(mu_);
  return serving_;
}

void HealthService::Shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  serving_ = false;
  shut_down_ = true;
  for (Watcher* w : watchers_) {
    w->Send(HealthCheckResponse::NOT_SERVING);
    w->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
  }
}

void HealthService::Remove(Watcher* watcher) {
  std::lock_guard<std::mutex> lock(mu_);
  watchers_.erase(watcher);
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* context,
                                               const HealthCheckRequest* request,
                                               HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (!Known(request->service())) {
    reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service \"" + request->service() + "\""));
    return reactor;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    response->set_status(StatusLocked(request->service()));
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* HealthService::Watch(grpc::CallbackServerContext* context,
                                                                   const HealthCheckRequest* request) {
  auto* watcher = new Watcher(this, request->service());
  std::lock_guard<std::mutex> lock(mu_);
  if (shut_down_) {
    watcher->Send(HealthCheckResponse::NOT_SERVING);
    watcher->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
    watchers_.insert(watcher);  // removed again in OnDone
    return watcher;
  }
  watchers_.insert(watcher);
  watcher->Send(StatusLocked(request->service()));
  return watcher;
}

}  // namespace needle::server
