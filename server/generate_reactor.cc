// The Generate stream's reactor. See generate_reactor.h for the threading and lifetime rules.
#include "server/generate_reactor.h"

#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/log.h"
#include "server/proto_convert.h"
#include "server/status_mapping.h"
#include "spdlog/spdlog.h"

namespace needle::server {
GenerateReactor* GenerateReactor::Start(engine::Engine* engine, grpc::CallbackServerContext* context,
                                        const v1::GenerateRequest& request, std::string request_id,
                                        const StreamOptions& options) {
  auto* reactor = new GenerateReactor(engine, context, std::move(request_id), options);
  reactor->Submit(request);
  return reactor;
}

GenerateReactor::GenerateReactor(engine::Engine* engine, grpc::CallbackServerContext* context,
                                 std::string request_id, const StreamOptions& options)
    : engine_(engine), context_(context), id_(std::move(request_id)), queue_(options.max_buffered_tokens) {}

void GenerateReactor::Submit(const v1::GenerateRequest& request) {
  grpc::Status refused;
  bool engine_ref = false;  // taken for Submit; dropped again unless the engine accepted
  try {
    absl::StatusOr<engine::Request> converted =
        RequestFromProto(request, engine_->tokenizer(), engine_->model().vocab_size,
                         DeadlineFromChrono(context_->deadline()));
    if (converted.ok()) {
      converted->id = id_;
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++refs_;  // the engine's reference, returned with its last event
        engine_ref = true;
      }
      absl::StatusOr<std::string> submitted =
          engine_->Submit(*std::move(converted), [this](engine::RequestEvent&& e) { OnEvent(std::move(e)); });
      if (submitted.ok()) {
        Log()->debug("request {}: accepted", id_);
        return;
      }
      refused = ToGrpcStatus(submitted.status());
    } else {
      refused = ToGrpcStatus(converted.status());
    }
    Log()->debug("request {}: refused: {}", id_, refused.error_message());
  } catch (const std::exception& e) {
    Log()->error("request {}: Generate failed: {}", id_, e.what());
    refused = grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat("internal error: ", e.what()));
  } catch (...) {
    Log()->error("request {}: Generate failed with an unknown exception", id_);
    refused = grpc::Status(grpc::StatusCode::INTERNAL, "internal error");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (engine_ref) --refs_;  // refused (or Submit threw before queueing): the sink is never called
    engine_done_ = true;
    accepting_ = false;
    finish_called_ = true;
  }
  Finish(refused);
}

void GenerateReactor::OnEvent(engine::RequestEvent&& event) {
  const bool last = event.kind == engine::RequestEvent::Kind::kFinished;
  Action action;
  bool cancel_engine = false;
  try {
    std::lock_guard<std::mutex> lock(mu_);
    HandleEventLocked(std::move(event), &cancel_engine);
    action = NextActionLocked();
  } catch (...) {
    // Nothing may escape into the engine thread: end the stream, stop the request.
    Log()->error("request {}: failed to stream an engine event; ending the request", id_);
    std::lock_guard<std::mutex> lock(mu_);
    if (last) engine_done_ = true;
    cancel_engine = !engine_done_;
    AbortStreamLocked(grpc::Status(grpc::StatusCode::INTERNAL, "internal error while streaming the response"));
    action = NextActionLocked();
  }
  if (cancel_engine) engine_->Cancel(id_);
  Perform(action);
  if (last) Unref();
}

void GenerateReactor::HandleEventLocked(engine::RequestEvent&& event, bool* cancel_engine) {
  using Kind = engine::RequestEvent::Kind;
  if (event.kind == Kind::kFinished) {
    engine_done_ = true;
    Log()->debug("request {}: finished ({}), {} tokens", id_, engine::FinishReasonName(event.reason),
                        event.usage.completion_tokens);
    if (event.reason == engine::FinishReason::kError) {
      Log()->error("request {}: engine error: {}", id_, event.status.ToString());
    }
    if (!accepting_) return;  // the stream is already ending with its own status
    accepting_ = false;
    final_status_ = FinishStatus(event.reason, event.status);
    v1::GenerateResponse message;
    EventToProto(event, &message);
    message.mutable_finished()->mutable_timings()->mutable_token_times_s()->Assign(token_times_s_.begin(),
                                                                                    token_times_s_.end());
    queue_.Push(std::move(message));  // carries no tokens: always accepted
    return;
  }
  if (!accepting_) return;
  v1::GenerateResponse message;
  EventToProto(event, &message);
  const size_t times_before = token_times_s_.size();
  token_times_s_.insert(token_times_s_.end(), event.token_times_s.begin(), event.token_times_s.end());
  if (!queue_.Push(std::move(message))) {
    token_times_s_.resize(times_before);
    Log()->warn("request {}: the client is reading too slowly ({} tokens buffered, limit {}); cancelling", id_,
                queue_.buffered_tokens(), queue_.max_buffered_tokens());
    *cancel_engine = true;
    AbortStreamLocked(grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("the client read the stream too slowly: more than ", queue_.max_buffered_tokens(),
                     " generated tokens were waiting to be sent; the request was cancelled")));
  }
}

void GenerateReactor::AbortStreamLocked(grpc::Status status) {
  accepting_ = false;
  queue_.Clear();
  if (!final_status_) final_status_ = std::move(status);
}

GenerateReactor::Action GenerateReactor::NextActionLocked() {
  Action action;
  if (writing_ || finish_called_) return action;
  if (!queue_.empty()) {
    queue_.Pop(&in_flight_);
    writing_ = true;
    action.kind = Action::Kind::kWrite;
    return action;
  }
  if (final_status_) {
    finish_called_ = true;
    action.kind = Action::Kind::kFinish;
    action.status = *final_status_;
  }
  return action;
}

void GenerateReactor::Perform(const Action& action) {
  switch (action.kind) {
    case Action::Kind::kNone:
      break;
    case Action::Kind::kWrite:
      StartWrite(&in_flight_);
      break;
    case Action::Kind::kFinish:
      Finish(action.status);
      break;
  }
}

void GenerateReactor::OnWriteDone(bool ok) {
  Action action;
  bool cancel_engine = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {  // the call is gone (cancelled or disconnected): nothing more can be sent
      cancel_engine = !engine_done_;
      AbortStreamLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled"));
    }
    action = NextActionLocked();
  }
  if (cancel_engine) engine_->Cancel(id_);
  Perform(action);
}

void GenerateReactor::OnCancel() {
  const bool deadline = context_->deadline() <= std::chrono::system_clock::now();
  Action action;
  bool cancel_engine = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancel_engine = !engine_done_;
    AbortStreamLocked(deadline ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the request's deadline passed")
                               : grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the request"));
    action = NextActionLocked();
  }
  Log()->debug("request {}: call {}", id_, deadline ? "deadline passed" : "cancelled");
  if (cancel_engine) {
    engine_->Cancel(id_, deadline ? engine::FinishReason::kDeadline : engine::FinishReason::kCancelled);
  }
  Perform(action);
}

void GenerateReactor::OnDone() { Unref(); }

void GenerateReactor::Unref() {
  bool last;
  {
    std::lock_guard<std::mutex> lock(mu_);
    last = --refs_ == 0;
  }
  if (last) delete this;
}

}  // namespace needle::server
