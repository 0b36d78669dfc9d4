// Shared client pieces; see client_common.h.
#include "clients/client_common.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>

namespace needle::clients {

void SetSyntheticPrompt(v1::GenerateRequest* request, int64_t n, int64_t offset) {
  auto* ids = request->mutable_token_ids();
  ids->clear_ids();
  for (int64_t i = 0; i < n; ++i) ids->add_ids(static_cast<uint32_t>(32 + (i + offset) % 95));
}

Summary Summarize(std::vector<double> v) {
  Summary s;
  s.n = v.size();
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / v.size();
  auto rank = [&](double p) { return v[std::min(v.size() - 1, static_cast<size_t>(std::ceil(p * v.size())) - 1)]; };
  s.p50 = rank(0.50);
  s.p90 = rank(0.90);
  s.p99 = rank(0.99);
  s.max = v.back();
  return s;
}

std::vector<double> Gaps(const std::vector<double>& times) {
  std::vector<double> gaps;
  for (size_t i = 1; i < times.size(); ++i) gaps.push_back(times[i] - times[i - 1]);
  return gaps;
}

nlohmann::json SummaryJson(const Summary& s) {
  return {{"n", s.n}, {"mean_s", s.mean}, {"p50_s", s.p50}, {"p90_s", s.p90}, {"p99_s", s.p99}, {"max_s", s.max}};
}

const char* ReasonName(v1::FinishReason r) {
  switch (r) {
    case v1::FINISH_REASON_STOP: return "stop";
    case v1::FINISH_REASON_LENGTH: return "length";
    case v1::FINISH_REASON_EOS: return "eos";
    case v1::FINISH_REASON_CANCELLED: return "cancelled";
    case v1::FINISH_REASON_DEADLINE: return "deadline";
    case v1::FINISH_REASON_ERROR: return "error";
    default: return "unspecified";
  }
}

const char* CodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                       "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
                                       "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < static_cast<int>(sizeof(kNames) / sizeof(kNames[0])) ? kNames[i] : "UNKNOWN_CODE";
}

bool ArgReader::Next() {
  if (++index_ >= argc_) return false;
  flag_ = argv_[index_];
  has_inline_value_ = false;
  if (const size_t eq = flag_.find('='); flag_.rfind("--", 0) == 0 && eq != std::string::npos) {
    inline_value_ = flag_.substr(eq + 1);
    flag_.resize(eq);
    has_inline_value_ = true;
  }
  if (flag_ == "--help" || flag_ == "-h") {
    std::cout << usage_;
    std::exit(0);
  }
  return true;
}

std::string ArgReader::Value() {
  if (has_inline_value_) return inline_value_;
  if (index_ + 1 >= argc_) Fail(flag_ + " needs a value");
  return argv_[++index_];
}

void ArgReader::Fail(const std::string& message) const {
  std::cerr << program_ << ": " << message << "\n\n" << usage_;
  std::exit(2);
}

}  // namespace needle::clients
