// needle.v1.Generation handlers. See generation_service.h.
#include "server/generation_service.h"

#include <exception>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/log.h"
#include "server/proto_convert.h"
#include "server/status_mapping.h"
#include "spdlog/spdlog.h"

namespace needle::server {
namespace {

const grpc::Status& NotReady() {
  static const grpc::Status* status =
      new grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is starting: the model is not loaded yet");
  return *status;
}

// Runs a unary handler body with the one catch-all every handler has, and finishes the call.
template <typename Body>
grpc::ServerUnaryReactor* RunUnary(grpc::CallbackServerContext* context, const char* method,
                                   const std::string& request_id, Body&& body) {
  grpc::Status status;
  try {
    status = body();
  } catch (const std::exception& e) {
    Log()->error("{} (request {}): internal error: {}", method, request_id, e.what());
    status = grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat("internal error: ", e.what()));
  } catch (...) {
    Log()->error("{} (request {}): internal error: unknown exception", method, request_id);
    status = grpc::Status(grpc::StatusCode::INTERNAL, "internal error");
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

// Finishes a Generate call that never reaches the engine.
class RefusedGenerate final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit RefusedGenerate(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

GenerationService::GenerationService(ServiceInfo info)
    : info_(std::move(info)), id_nonce_(std::random_device{}() & 0xffffffu) {}

std::string GenerationService::NewRequestId() {
  return absl::StrFormat("req-%06x-%d", id_nonce_, id_counter_.fetch_add(1, std::memory_order_relaxed) + 1);
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerationService::Generate(grpc::CallbackServerContext* context,
                                                                            const v1::GenerateRequest* request) {
  std::string id = request->request_id();
  try {
    engine::Engine* engine = engine_.load(std::memory_order_acquire);
    if (engine == nullptr) return new RefusedGenerate(NotReady());
    if (id.empty()) id = NewRequestId();
    return GenerateReactor::Start(engine, context, *request, id, info_.stream);
  } catch (const std::exception& e) {
    Log()->error("Generate (request {}): internal error: {}", id, e.what());
    return new RefusedGenerate(grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat("internal error: ", e.what())));
  } catch (...) {
    Log()->error("Generate (request {}): internal error: unknown exception", id);
    return new RefusedGenerate(grpc::Status(grpc::StatusCode::INTERNAL, "internal error"));
  }
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* context,
                                                      const v1::TokenizeRequest* request,
                                                      v1::TokenizeResponse* response) {
  return RunUnary(context, "Tokenize", "-", [&]() -> grpc::Status {
    engine::Engine* engine = engine_.load(std::memory_order_acquire);
    if (engine == nullptr) return NotReady();
    absl::StatusOr<std::vector<int32_t>> ids = EncodeText(request->text(), engine->tokenizer(), "text");
    if (!ids.ok()) return ToGrpcStatus(ids.status());
    response->mutable_token_ids()->Reserve(static_cast<int>(ids->size()));
    for (int32_t id : *ids) response->add_token_ids(static_cast<uint32_t>(id));
    return grpc::Status::OK;
  });
}

grpc::ServerUnaryReactor* GenerationService::GetModelInfo(grpc::CallbackServerContext* context,
                                                          const v1::GetModelInfoRequest* request,
                                                          v1::ModelInfo* response) {
  return RunUnary(context, "GetModelInfo", "-", [&]() -> grpc::Status {
    engine::Engine* engine = engine_.load(std::memory_order_acquire);
    if (engine == nullptr) return NotReady();
    *response = ModelInfoToProto(engine->model(), info_.model, engine->tokenizer().name(), info_.backend,
                                 engine->cache_config().page_tokens);
    return grpc::Status::OK;
  });
}

grpc::ServerUnaryReactor* GenerationService::Abort(grpc::CallbackServerContext* context,
                                                   const v1::AbortRequest* request, v1::AbortResponse* response) {
  return RunUnary(context, "Abort", request->request_id(), [&]() -> grpc::Status {
    engine::Engine* engine = engine_.load(std::memory_order_acquire);
    if (engine == nullptr) return NotReady();
    if (request->request_id().empty()) {
      return ToGrpcStatus(absl::InvalidArgumentError("request_id: empty"));
    }
    response->set_was_live(engine->Cancel(request->request_id(), engine::FinishReason::kCancelled));
    Log()->debug("request {}: abort (live: {})", request->request_id(), response->was_live());
    return grpc::Status::OK;
  });
}

grpc::ServerUnaryReactor* GenerationService::GetStats(grpc::CallbackServerContext* context,
                                                      const v1::GetStatsRequest* request,
                                                      v1::ServerStats* response) {
  return RunUnary(context, "GetStats", "-", [&]() -> grpc::Status {
    engine::Engine* engine = engine_.load(std::memory_order_acquire);
    if (engine == nullptr) return NotReady();
    *response = StatsToProto(engine->Stats());
    return grpc::Status::OK;
  });
}

}  // namespace needle::server
