// Scheduler: the pure policy that decides, from a read-only view of the live sequences and the free
// pages, which waiting requests to admit and which token chunks to run in the next step. No threads,
// clocks, CUDA or gRPC inside; tested by scripted multi-step scenarios.
//
// Policy (engine/README.md): decodes first (every running sequence with one pending token), then
// FIFO admission while the batch has room and the whole sequence's pages (prompt + max_tokens) fit,
// then prefill chunks of at most `prefill_chunk` tokens in admission order until the step's token
// budget is spent. A long prompt therefore delays running streams by at most one chunk per step.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "engine/kv_cache.h"

namespace needle::engine {

struct SchedulerConfig {
  int max_batch = 32;            // running sequences at most
  int prefill_chunk = 512;       // tokens of one sequence per step at most
  int step_token_budget = 2048;  // tokens per step at most; >= max_batch so decodes always fit

  absl::Status Validate() const;
};

struct SeqView {
  SeqId seq = 0;
  int64_t num_tokens = 0;      // prompt + generated so far
  int64_t computed = 0;        // tokens whose K/V is in the cache
  int64_t reserve_tokens = 0;  // capacity to reserve at admission (prompt + max_tokens)
};

struct ScheduleInput {
  std::vector<SeqView> running;  // admission order
  std::vector<SeqView> waiting;  // arrival order
  const CacheLayout* layout = nullptr;
  int64_t free_pages[kNumPools] = {0, 0, 0, 0};
};

struct ScheduledChunk {
  SeqId seq = 0;
  int64_t start = 0;  // first position
  int64_t len = 0;    // tokens
};

struct Schedule {
  std::vector<SeqId> admit;             // waiting sequences to admit (reserve), in order
  std::vector<ScheduledChunk> chunks;   // decodes first, then prefill chunks
  int64_t tokens = 0;                   // total tokens in chunks
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config) : config_(config) {}
  Schedule Plan(const ScheduleInput& input) const;
  const SchedulerConfig& config() const { return config_; }

 private:
  SchedulerConfig config_;
};

}  // namespace needle::engine
