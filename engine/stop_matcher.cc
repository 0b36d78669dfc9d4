// Incremental stop-string matching over a request's streamed text (semantics in stop_matcher.h).
// The held text is shorter than the longest stop string, so each Feed() costs
// O(stops x (held + new) + stops x longest^2) at worst with plain searches; stop strings are few and
// short (kMaxStopStrings, kMaxStopStringBytes), which keeps this well below a model step.
#include "engine/stop_matcher.h"

#include <algorithm>
#include <utility>

namespace needle::engine {

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}

StopMatcher::Result StopMatcher::Feed(absl::string_view new_text) {
  Result result;
  if (stopped_) return result;
  const size_t old_size = held_.size();
  held_.append(new_text.data(), new_text.size());
  const absl::string_view text(held_);

  // Every match ends in the new text: one inside the old held text would have been found earlier.
  size_t best_start = 0, best_end = absl::string_view::npos;
  int best = -1;
  for (size_t i = 0; i < stops_.size(); ++i) {
    const std::string& stop = stops_[i];
    if (stop.empty()) continue;
    const size_t from = old_size >= stop.size() ? old_size - stop.size() + 1 : 0;
    const size_t pos = text.find(stop, from);
    if (pos == absl::string_view::npos) continue;
    const size_t end = pos + stop.size();
    if (end < best_end || (end == best_end && pos < best_start)) {
      best = static_cast<int>(i);
      best_start = pos;
      best_end = end;
    }
  }
  if (best >= 0) {
    result.text = held_.substr(0, best_start);
    result.matched = true;
    result.stop_index = best;
    result.stop = stops_[best];
    stopped_ = true;
    held_.clear();
    return result;
  }

  const size_t release = held_.size() - LongestPartialSuffix();
  result.text = held_.substr(0, release);
  held_.erase(0, release);
  return result;
}

std::string StopMatcher::Flush() {
  std::string out;
  out.swap(held_);
  return out;
}

size_t StopMatcher::LongestPartialSuffix() const {
  const absl::string_view text(held_);
  size_t best = 0;
  for (const std::string& stop : stops_) {
    if (stop.empty()) continue;
    const size_t longest = std::min(stop.size() - 1, text.size());
    for (size_t k = longest; k > best; --k) {
      if (text.substr(text.size() - k) == absl::string_view(stop).substr(0, k)) {
        best = k;
        break;
      }
    }
  }
  return best;
}

}  // namespace needle::engine
