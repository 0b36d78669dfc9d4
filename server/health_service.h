// HealthService: the standard grpc.health.v1.Health service (Check and Watch) for the server as a
// whole ("") and for "needle.v1.Generation". It starts NOT_SERVING; the server flips it to SERVING
// once the engine is built and warmed up, and back to NOT_SERVING when draining. Owns only the
// status and the open Watch streams; knows nothing of the engine.
#pragma once

#include <mutex>
#include <set>
#include <string>

#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace needle::server {

class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  HealthService() = default;
  ~HealthService() override;

  void SetServing(bool serving);
  bool serving() const;
  // Ends every open Watch (call before shutting the server down, so they do not hold it up).
  void Shutdown();

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context, const grpc::health::v1::HealthCheckRequest* request) override;

 private:
  class Watcher;
  static bool Known(const std::string& service);
  ServingStatus StatusLocked(const std::string& service) const;
  void Remove(Watcher* watcher);

  mutable std::mutex mu_;
  bool serving_ = false;
  bool shut_down_ = false;
  std::set<Watcher*> watchers_;
};

}  // namespace needle::server
