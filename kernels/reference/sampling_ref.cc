// Naive sampling reference: every step over the whole vocabulary, candidates fully sorted.
#include "kernels/reference/sampling_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace needle::kernels::reference {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

double Clean(float x) { return std::isnan(x) ? -kInf : static_cast<double>(x); }

}  // namespace

void ApplyPenaltiesRef(const SamplingRowRef& row, const std::vector<PenaltyEntryRef>& history, float* logits,
                       int vocab) {
  for (const PenaltyEntryRef& e : history) {
    if (e.id < 0 || e.id >= vocab) continue;
    float x = logits[e.id];
    if (row.repetition_penalty != 1.0f) x = x > 0 ? x / row.repetition_penalty : x * row.repetition_penalty;
    if (e.count > 0 && (row.presence_penalty != 0.0f || row.frequency_penalty != 0.0f)) {
      const float sub = row.presence_penalty + row.frequency_penalty * static_cast<float>(e.count);
      x = x - sub;
    }
    logits[e.id] = x;
  }
}

CandidatesRef SamplingCandidatesRef(const SamplingRowRef& row, const float* penalized, int vocab) {
  CandidatesRef c;
  if (row.temperature == 0.0f) return c;
  double m = -kInf;
  for (int i = 0; i < vocab; ++i) m = std::max(m, Clean(penalized[i]));
  if (m == -kInf) return c;
  std::vector<double> p(vocab);
  for (int i = 0; i < vocab; ++i) {
    const double x = Clean(penalized[i]);
    p[i] = m == kInf ? (x == kInf ? 1.0 : 0.0) : std::exp((x - m) / static_cast<double>(row.temperature));
  }
  std::vector<int32_t> order;
  for (int i = 0; i < vocab; ++i) {
    if (p[i] > 0) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
  size_t n = order.size();
  if (row.top_k > 0 && static_cast<size_t>(row.top_k) < n) n = row.top_k;
  if (row.top_p < 1.0f) {
    double total = 0;
    for (size_t i = 0; i < n; ++i) total += p[order[i]];
    const double target = static_cast<double>(row.top_p) * total;
    double cum = 0;
    for (size_t i = 0; i < n; ++i) {
      cum += p[order[i]];
      if (cum >= target) {
        n = i + 1;
        break;
      }
    }
  }
  if (row.min_p > 0.0f) {
    size_t keep = 0;
    while (keep < n && p[order[keep]] >= static_cast<double>(row.min_p)) ++keep;
    n = keep;
  }
  for (size_t i = 0; i < n; ++i) {
    c.ids.push_back(order[i]);
    c.p.push_back(p[order[i]]);
    c.mass += p[order[i]];
  }
  return c;
}

int32_t SampleRef(const SamplingRowRef& row, const std::vector<PenaltyEntryRef>& history, const float* logits,
                  int vocab, double u) {
  std::vector<float> x(logits, logits + vocab);
  ApplyPenaltiesRef(row, history, x.data(), vocab);
  if (row.temperature == 0.0f) {
    int32_t best = 0;
    for (int i = 1; i < vocab; ++i) {
      if (Clean(x[i]) > Clean(x[best])) best = i;
    }
    return best;
  }
  const CandidatesRef c = SamplingCandidatesRef(row, x.data(), vocab);
  if (c.ids.empty()) return 0;
  const double target = u * c.mass;
  double cum = 0;
  for (size_t i = 0; i < c.ids.size(); ++i) {
    cum += c.p[i];
    if (cum > target) return c.ids[i];
  }
  return c.ids.back();
}

void LogSoftmaxRef(const float* logits, int vocab, float* out) {
  double m = -kInf;
  for (int i = 0; i < vocab; ++i) m = std::max(m, Clean(logits[i]));
  if (std::isfinite(m)) {
    double s = 0;
    for (int i = 0; i < vocab; ++i) s += std::exp(Clean(logits[i]) - m);
    const double lse = m + std::log(s);
    for (int i = 0; i < vocab; ++i) out[i] = static_cast<float>(Clean(logits[i]) - lse);
    return;
  }
  double num_inf = 0;
  if (m == kInf) {
    for (int i = 0; i < vocab; ++i) num_inf += logits[i] == static_cast<float>(kInf) ? 1 : 0;
  }
  for (int i = 0; i < vocab; ++i) {
    out[i] = m == kInf && logits[i] == static_cast<float>(kInf) ? static_cast<float>(-std::log(num_inf))
                                                                 : -std::numeric_limits<float>::infinity();
  }
}

}  // namespace needle::kernels::reference
