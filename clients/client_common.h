// Pieces the command-line clients share: synthetic prompts, latency summaries (nearest-rank
// percentiles), and names of finish reasons and status codes. Depends on the generated API only.
#pragma once

#include <cstdint>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "needle/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace needle::clients {

// Sets `n` synthetic prompt ids cycling over the printable bytes (32..126), starting `offset` in.
void SetSyntheticPrompt(v1::GenerateRequest* request, int64_t n, int64_t offset);

// Mean and percentiles (nearest rank) of a sample, in seconds.
struct Summary {
  size_t n = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};
Summary Summarize(std::vector<double> v);
nlohmann::json SummaryJson(const Summary& s);

// Gaps between consecutive token times (the first token's time itself is the time to first token).
std::vector<double> Gaps(const std::vector<double>& times);

const char* ReasonName(v1::FinishReason r);
const char* CodeName(grpc::StatusCode code);

}  // namespace needle::clients
