// What a client asks of the engine and what the engine tells it back: request, sampling and stopping
// parameters with their validation, and the events a request's sink receives. Plain data; no threads.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace needle::engine {

// Defaults are what an unset field means. Validate() names the offending field.
struct SamplingParams {
  float temperature = 1.0f;         // >= 0; 0 = greedy
  float top_p = 1.0f;               // (0, 1]
  int top_k = 0;                    // >= 0; 0 = no limit
  float min_p = 0.0f;               // [0, 1]
  float repetition_penalty = 1.0f;  // (0, 10]; 1 = off (divides positive logits of seen tokens)
  float presence_penalty = 0.0f;    // [-2, 2]
  float frequency_penalty = 0.0f;   // [-2, 2]
  std::optional<uint64_t> seed;     // set: the output depends only on the request, not the batch

  absl::Status Validate() const;
};

inline constexpr size_t kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;
inline constexpr size_t kMaxStopTokenIds = 64;

struct StoppingCriteria {
  std::optional<int64_t> max_tokens;  // unset: until the context is full; set: >= 1
  std::vector<std::string> stop;      // stop strings, matched across token boundaries
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;

  absl::Status Validate() const;
};

struct Request {
  std::string id;  // unique among live requests; the engine assigns one if empty
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  StoppingCriteria stopping;
  bool return_logprobs = false;
  int top_logprobs = 0;  // [0, 20]
  absl::Time deadline = absl::InfiniteFuture();
};

enum class FinishReason {
  kUnspecified = 0,
  kStop = 1,       // a stop string or stop token id matched
  kLength = 2,     // max_tokens reached or the context is full
  kEos = 3,        // the model emitted EOS
  kCancelled = 4,  // the client went away or called Abort
  kDeadline = 5,   // the request's deadline passed
  kError = 6,      // the engine failed the request (status says why)
};
const char* FinishReasonName(FinishReason reason);

struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // the top_logprobs most likely ids, best first
};

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

// Seconds, measured on the engine's clock from the moment Submit() accepted the request.
struct Timings {
  double queue_s = 0;        // waiting for admission
  double prefill_s = 0;      // admission to the end of the prompt's last chunk
  double first_token_s = 0;  // arrival to the first generated token
  double decode_s = 0;       // first token to finish
};

// One event on a request's stream. Delivered in order; kFinished is always last and always sent.
struct RequestEvent {
  enum class Kind { kPrefillProgress, kTokens, kFinished };
  Kind kind = Kind::kTokens;
  std::string request_id;
  // kPrefillProgress
  int64_t prefilled_tokens = 0;
  int64_t prompt_tokens = 0;
  // kTokens: new ids, the UTF-8-complete text they complete, per-token time since arrival (s).
  std::vector<int32_t> token_ids;
  std::string text;
  std::vector<double> token_times_s;
  std::vector<TokenLogprob> logprobs;
  // kFinished
  FinishReason reason = FinishReason::kUnspecified;
  std::string matched_stop;
  absl::Status status;  // OK unless reason is kError/kDeadline/kCancelled
  Usage usage;
  Timings timings;
};

// Receives a request's events on the engine thread. Must return quickly and never block.
using EventSink = std::function<void(RequestEvent&&)>;

}  // namespace needle::engine
