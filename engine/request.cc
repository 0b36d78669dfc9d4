// Validation of the client-supplied sampling and stopping parameters, and the names of the finish
// reasons. Every check names the field and the offending value so a client can fix its request; the
// engine refuses a request here rather than discovering a bad value in the per-token path.
#include "engine/request.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer.h"

namespace needle::engine {
namespace {

absl::Status FieldError(absl::string_view field, absl::string_view requirement, float value) {
  // absl::StrCat prints NaN and infinities as "nan", "inf" and "-inf".
  return absl::InvalidArgumentError(absl::StrCat(field, " must be ", requirement, ", got ", value));
}

// Checks lo <= value <= hi (or lo < value when `lo_open`); NaN and infinities always fail.
absl::Status CheckRange(absl::string_view field, float value, float lo, bool lo_open, float hi,
                        absl::string_view requirement) {
  bool ok = std::isfinite(value) && (lo_open ? value > lo : value >= lo) && value <= hi;
  return ok ? absl::OkStatus() : FieldError(field, requirement, value);
}

}  // namespace

absl::Status SamplingParams::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0) {
    return FieldError("sampling.temperature", "finite and >= 0", temperature);
  }
  absl::Status s = CheckRange("sampling.top_p", top_p, 0, true, 1, "finite and in (0, 1]");
  if (!s.ok()) return s;
  if (top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.top_k must be >= 0, got ", top_k));
  }
  s = CheckRange("sampling.min_p", min_p, 0, false, 1, "finite and in [0, 1]");
  if (!s.ok()) return s;
  s = CheckRange("sampling.repetition_penalty", repetition_penalty, 0, true, 10,
                 "finite and in (0, 10]");
  if (!s.ok()) return s;
  s = CheckRange("sampling.presence_penalty", presence_penalty, -2, false, 2,
                 "finite and in [-2, 2]");
  if (!s.ok()) return s;
  return CheckRange("sampling.frequency_penalty", frequency_penalty, -2, false, 2,
                    "finite and in [-2, 2]");
}

absl::Status StoppingCriteria::Validate() const {
  if (max_tokens && *max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("stopping.max_tokens must be >= 1 when set, got ", *max_tokens));
  }
  if (stop.size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat("stopping.stop has ", stop.size(),
                                                   " strings, at most ", kMaxStopStrings,
                                                   " are allowed"));
  }
  for (size_t i = 0; i < stop.size(); ++i) {
    const std::string& s = stop[i];
    if (s.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("stopping.stop[", i, "] must not be empty"));
    }
    if (s.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stopping.stop[", i, "] is ", s.size(),
                                                     " bytes, at most ", kMaxStopStringBytes,
                                                     " are allowed"));
    }
    if (!IsValidUtf8(s)) {
      return absl::InvalidArgumentError(absl::StrCat("stopping.stop[", i, "] is not valid UTF-8"));
    }
  }
  if (stop_token_ids.size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(absl::StrCat("stopping.stop_token_ids has ",
                                                   stop_token_ids.size(), " ids, at most ",
                                                   kMaxStopTokenIds, " are allowed"));
  }
  for (size_t i = 0; i < stop_token_ids.size(); ++i) {
    if (stop_token_ids[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("stopping.stop_token_ids[", i,
                                                     "] must be >= 0, got ", stop_token_ids[i]));
    }
  }
  return absl::OkStatus();
}

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kUnspecified:
      return "unspecified";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kDeadline:
      return "deadline";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

}  // namespace needle::engine
