// Pieces the command-line clients share: synthetic prompts, latency summaries (nearest-rank
// percentiles), and names of finish reasons and status codes. Depends on the generated API only.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
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

// The clients' command line: `--name VALUE` or `--name=VALUE`, read in order. Every error prints
// "<program>: <message>", the usage, and exits with status 2; --help / -h print the usage and exit 0.
class ArgReader {
 public:
  ArgReader(int argc, char** argv, std::string program, std::string usage)
      : argc_(argc), argv_(argv), program_(std::move(program)), usage_(std::move(usage)) {}

  // Moves to the next argument; false when none is left.
  bool Next();
  // The current argument's name ("--max-tokens"), without an inline "=value".
  const std::string& flag() const { return flag_; }
  // The current flag's value: the inline one, else the next argument.
  std::string Value();
  // Value() parsed as a number of type T (the whole text must parse).
  template <typename T>
  T Number() {
    const std::string text = Value();
    std::istringstream in(text);
    T value{};
    in >> value;
    if (in.fail() || !in.eof()) Fail(flag_ + ": not a number: \"" + text + "\"");
    return value;
  }
  [[noreturn]] void Fail(const std::string& message) const;

 private:
  int argc_;
  char** argv_;
  std::string program_, usage_;
  int index_ = 0;
  std::string flag_, inline_value_;
  bool has_inline_value_ = false;
};

}  // namespace needle::clients
