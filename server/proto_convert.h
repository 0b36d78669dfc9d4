// Conversions between the wire API (needle.v1 protos) and the engine's plain structs: a
// GenerateRequest becomes an engine::Request (tokenising text, checking what only the wire format
// can get wrong: a missing input, ids that do not fit the vocabulary, over-long ids), and engine
// events, model configuration and statistics become protos. Value ranges of sampling and stopping
// parameters are the engine's to check (engine/request.cc), so each rule lives in one place. No
// gRPC calls, no threads.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "engine/model_config.h"
#include "engine/request.h"
#include "engine/tokenizer.h"
#include "needle/v1/generation.pb.h"

namespace needle::server {

inline constexpr size_t kMaxRequestIdBytes = 128;

// The engine request for `proto`, with `deadline` (absl::InfiniteFuture() for none). Errors are
// INVALID_ARGUMENT naming the proto field (e.g. "input.token_ids.ids[3]").
absl::StatusOr<engine::Request> RequestFromProto(const v1::GenerateRequest& proto,
                                                 const engine::Tokenizer& tokenizer, int vocab_size,
                                                 absl::Time deadline = absl::InfiniteFuture());

// Token ids of `text`; INVALID_ARGUMENT naming `field` when it is not valid UTF-8.
absl::StatusOr<std::vector<int32_t>> EncodeText(const std::string& text, const engine::Tokenizer& tokenizer,
                                                const char* field);

// A gRPC deadline (system_clock::time_point::max() when the call has none) as an absl::Time.
absl::Time DeadlineFromChrono(std::chrono::system_clock::time_point deadline);

v1::FinishReason FinishReasonToProto(engine::FinishReason reason);

// Appends a kTokens event's ids, text, times and logprobs to `chunk` (coalescing appends to a chunk
// that already holds earlier tokens).
void AppendTokens(const engine::RequestEvent& event, v1::TokenChunk* chunk);

// One engine event as a stream message. A kFinished event's per-token times are not in the event;
// the caller fills Finished.timings.token_times_s from the chunks it streamed.
void EventToProto(const engine::RequestEvent& event, v1::GenerateResponse* out);

// The served model. `model` is the preset name or checkpoint path, `backend` the executor.
v1::ModelInfo ModelInfoToProto(const engine::ModelConfig& config, const std::string& model,
                               const std::string& tokenizer, const std::string& backend, int page_tokens);

v1::ServerStats StatsToProto(const engine::EngineStats& stats);

}  // namespace needle::server
