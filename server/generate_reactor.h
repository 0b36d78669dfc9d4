// GenerateReactor: one server-streaming Generate call. It submits the request to the engine, turns
// the engine's events into stream messages, and keeps exactly one write in flight (the next starts
// from OnWriteDone). Engine events arrive on the engine thread through the EventSink, which never
// blocks: it queues the message under the reactor's mutex (ResponseQueue: coalescing and the
// slow-reader bound) and starts a write only if none is in flight. OnCancel (client cancel,
// disconnect, deadline) cancels the engine request; the call's deadline is also handed to the engine
// so it ends the request itself with FinishReason::kDeadline.
//
// Lifetime: the reactor deletes itself when both gRPC (OnDone) and the engine (its last event,
// kFinished, which the engine always delivers for an accepted request) are done with it. gRPC calls
// (StartWrite/Finish) are made outside the mutex.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "grpcpp/grpcpp.h"
#include "needle/v1/generation.pb.h"
#include "server/response_queue.h"

namespace needle::server {

struct StreamOptions {
  int64_t max_buffered_tokens = 8192;  // the slow-reader bound (response_queue.h)
};

class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  // Creates a reactor for the call and submits `request` to `engine` under `request_id` (non-empty).
  // Validation and admission errors finish the call at once with their status. `engine` must outlive
  // every reactor (the server stops the engine and waits for gRPC before destroying it).
  static GenerateReactor* Start(engine::Engine* engine, grpc::CallbackServerContext* context,
                                const v1::GenerateRequest& request, std::string request_id,
                                const StreamOptions& options);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // What to do with the stream next, decided under mu_ and carried out after releasing it.
  struct Action {
    enum class Kind { kNone, kWrite, kFinish };
    Kind kind = Kind::kNone;
    grpc::Status status;
  };

  GenerateReactor(engine::Engine* engine, grpc::CallbackServerContext* context, std::string request_id,
                  const StreamOptions& options);
  void Submit(const v1::GenerateRequest& request);
  void OnEvent(engine::RequestEvent&& event);  // the engine thread
  void HandleEventLocked(engine::RequestEvent&& event, bool* cancel_engine);
  // Ends the stream with `status` after the message being written (if any); drops queued messages.
  void AbortStreamLocked(grpc::Status status);
  Action NextActionLocked();
  void Perform(const Action& action);
  void Unref();

  engine::Engine* const engine_;
  grpc::CallbackServerContext* const context_;
  const std::string id_;

  std::mutex mu_;
  ResponseQueue queue_;              // guarded by mu_
  v1::GenerateResponse in_flight_;   // the message gRPC is writing; touched only while writing_
  bool writing_ = false;             // guarded by mu_
  bool accepting_ = true;            // events are still streamed (false once the stream is ending)
  bool finish_called_ = false;
  bool engine_done_ = false;         // kFinished delivered (or never submitted)
  std::optional<grpc::Status> final_status_;
  std::vector<double> token_times_s_;  // every streamed token's server time, for Finished
  int refs_ = 1;                     // gRPC, plus the engine while it may call the sink
};

}  // namespace needle::server
