// The executor interface: runs one engine step (a batch of prefill chunks and single-token decodes)
// over the paged KV caches and returns logits. An executor never sees requests, sampling policy or
// pool accounting: only the step plan, whose page tables the KvCacheManager owns.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "engine/kv_cache.h"

namespace needle::engine {

// One sequence's part of a step: tokens at positions start_pos .. start_pos + tokens.size() - 1.
// A decode is a chunk of one token. The sequence's caches already hold positions < start_pos.
struct SeqStep {
  SeqId seq = 0;
  int64_t start_pos = 0;
  std::vector<int32_t> tokens;
  const SequencePages* pages = nullptr;  // capacity_tokens >= start_pos + tokens.size()
  bool all_logits = false;               // logits for every token, not only the last
};

struct StepPlan {
  std::vector<SeqStep> seqs;
};

// Logits of the step, row-major [rows][vocab]: for each SeqStep in plan order, one row (its last
// token) or tokens.size() rows (all_logits).
struct StepOutput {
  int vocab = 0;
  std::vector<float> logits;
  std::vector<int64_t> first_row;  // per SeqStep: index of its first row

  const float* Row(int64_t r) const { return logits.data() + r * vocab; }
  // The row of the last token of plan.seqs[i].
  const float* LastRow(size_t i, const StepPlan& plan) const {
    const SeqStep& s = plan.seqs[i];
    return Row(first_row[i] + (s.all_logits ? static_cast<int64_t>(s.tokens.size()) - 1 : 0));
  }
};

class Executor {
 public:
  virtual ~Executor() = default;
  virtual const char* name() const = 0;
  // Runs the step: appends the tokens' K/V to the caches and computes logits. A non-OK status means
  // the caches of the plan's sequences are undefined (their requests must fail).
  virtual absl::Status Run(const StepPlan& plan, StepOutput* out) = 0;
};

}  // namespace needle::engine
