// What the engine measures for monitoring, beyond the request counts of EngineStats: token totals
// and latency histograms, kept by the engine thread and published with EngineStats after every step.
// The shapes are Prometheus's (server/metrics.h renders them): a histogram is a fixed set of upper
// bounds with a count per bucket, a sum and a count.
#pragma once

#include <array>
#include <cstdint>

namespace needle::engine {

// Durations in seconds over fixed buckets. A value goes to the first bucket whose upper bound is at
// least the value (Prometheus's "le"), or past the last bound.
struct LatencyHistogram {
  static constexpr std::array<double, 18> kBounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                     1,     2.5,    5,     10,   30,    60,   120,  300, 600};
  std::array<int64_t, kBounds.size() + 1> buckets{};  // per bucket, not cumulative; the last is (600, inf)
  int64_t count = 0;
  double sum = 0;

  // Negative and NaN durations count as 0.
  void Observe(double seconds);
};

struct EngineMetrics {
  int64_t prompt_tokens = 0;      // prompt tokens of requests whose prefill completed
  int64_t generation_tokens = 0;  // tokens sampled
  LatencyHistogram queue_time;           // arrival to admission, per admitted request
  LatencyHistogram time_to_first_token;  // arrival to the first generated token
  LatencyHistogram inter_token_latency;  // between consecutive generated tokens of a request
  LatencyHistogram request_latency;      // arrival to the end, per request that finished (STOP, LENGTH, EOS)
};

}  // namespace needle::engine
