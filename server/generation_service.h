// GenerationService: the needle.v1.Generation handlers (gRPC callback API). Generate hands each
// call to a GenerateReactor; the unary handlers answer inline. Every handler has one catch-all that
// turns an escaped exception into INTERNAL and logs it with the request id. Until the server sets
// an engine (after warm-up) every RPC gets UNAVAILABLE. Engine statuses go through ToGrpcStatus.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "engine/engine.h"
#include "grpcpp/grpcpp.h"
#include "needle/v1/generation.grpc.pb.h"
#include "server/generate_reactor.h"

namespace needle::server {

struct ServiceInfo {
  std::string model;    // as given to --model
  std::string backend;  // as given to --backend
  StreamOptions stream;
};

class GenerationService final : public v1::Generation::CallbackService {
 public:
  explicit GenerationService(ServiceInfo info);

  // Starts serving with `engine` (which must outlive the gRPC server); before this, UNAVAILABLE.
  void SetEngine(engine::Engine* engine) { engine_.store(engine, std::memory_order_release); }

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* context,
                                                           const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context, const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request, v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* context, const v1::AbortRequest* request,
                                  v1::AbortResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* context, const v1::GetStatsRequest* request,
                                     v1::ServerStats* response) override;

 private:
  std::string NewRequestId();

  const ServiceInfo info_;
  std::atomic<engine::Engine*> engine_{nullptr};
  const uint64_t id_nonce_;  // distinguishes this process's generated ids from another's
  std::atomic<uint64_t> id_counter_{0};
};

}  // namespace needle::server
