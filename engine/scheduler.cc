// The scheduling policy; see scheduler.h.
#include "engine/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace needle::engine {

absl::Status SchedulerConfig::Validate() const {
  if (max_batch < 1) return absl::InvalidArgumentError("max_batch must be >= 1");
  if (prefill_chunk < 1) return absl::InvalidArgumentError("prefill_chunk must be >= 1");
  if (step_token_budget < max_batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("step_token_budget (", step_token_budget, ") must be >= max_batch (", max_batch, ")"));
  }
  return absl::OkStatus();
}

Schedule Scheduler::Plan(const ScheduleInput& in) const {
  Schedule out;
  int64_t budget = config_.step_token_budget;
  // 1. Decodes: sequences whose prompt is done and that wait for their next token.
  for (const SeqView& s : in.running) {
    if (s.num_tokens - s.computed == 1 && s.computed > 0 && budget > 0) {
      out.chunks.push_back({s.seq, s.computed, 1});
      --budget;
    }
  }
  // 2. Admission, FIFO: stop at the first request that does not fit (no overtaking, no starvation).
  int64_t free_pages[kNumPools];
  std::copy(in.free_pages, in.free_pages + kNumPools, free_pages);
  size_t batch = in.running.size();
  std::vector<const SeqView*> prefill;
  for (const SeqView& s : in.running) {
    if (s.num_tokens - s.computed >= 1 && !(s.num_tokens - s.computed == 1 && s.computed > 0)) prefill.push_back(&s);
  }
  for (const SeqView& s : in.waiting) {
    if (batch >= static_cast<size_t>(config_.max_batch)) break;
    std::vector<int64_t> need = in.layout->PagesFor(s.reserve_tokens);
    bool fits = true;
    for (int p = 0; p < kNumPools; ++p) fits = fits && need[p] <= free_pages[p];
    if (!fits) break;
    for (int p = 0; p < kNumPools; ++p) free_pages[p] -= need[p];
    out.admit.push_back(s.seq);
    prefill.push_back(&s);
    ++batch;
  }
  // 3. Prefill chunks in admission order.
  for (const SeqView* s : prefill) {
    if (budget <= 0) break;
    const int64_t len = std::min<int64_t>({s->num_tokens - s->computed, config_.prefill_chunk, budget});
    out.chunks.push_back({s->seq, s->computed, len});
    budget -= len;
  }
  out.tokens = config_.step_token_budget - budget;
  return out;
}

}  // namespace needle::engine
