// The per-request sampler: penalties, greedy and filtered random sampling, log-probabilities, and the
// request's xoshiro256** stream. The semantics are specified in sampler.h; this file keeps a step at
// expected O(vocab) by replacing "sort, then walk the cumulative mass" with selection.
#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace needle::engine {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Below this many, PrefixReaching sorts and walks instead of bisecting further.
constexpr size_t kSortBelow = 64;

uint64_t SplitMix64(uint64_t* x) {
  uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// NaN logits (an executor fault) must not poison comparisons or sums: they rank as -inf.
double Clean(float x) { return std::isnan(x) ? -kInf : static_cast<double>(x); }

// The candidate order: more probable first, ties to the lower id. A strict total order (ids differ).
template <typename Candidate>
bool Better(const Candidate& a, const Candidate& b) {
  return a.p > b.p || (a.p == b.p && a.id < b.id);
}

// Rearranges c[0, n) so that c[0, k) is the shortest prefix of the sorted order whose mass reaches
// `target` (mass > target when `strict`, else >= target) and c[k-1] is that prefix's last element
// in sorted order; returns k, and the prefix's mass in *mass. If rounding keeps the whole range
// short of the target, k = n. Expected O(n): each round selects the better half of the unresolved
// range and keeps the side where the running mass crosses the target.
template <typename Candidate>
size_t PrefixReaching(Candidate* c, size_t n, double target, bool strict, double* mass) {
  auto reaches = [&](double m) { return strict ? m > target : m >= target; };
  // Invariant: c[0, lo) is a prefix of the sorted order with mass `base` that does not reach the
  // target; every element of [lo, hi) ranks above every element of [hi, n); the answer is in (lo, hi].
  size_t lo = 0, hi = n;
  double base = 0;
  while (hi - lo > kSortBelow) {
    const size_t mid = lo + (hi - lo) / 2;
    std::nth_element(c + lo, c + mid, c + hi, Better<Candidate>);
    double left = 0;
    for (size_t i = lo; i <= mid; ++i) left += c[i].p;
    if (reaches(base + left)) {
      hi = mid + 1;
    } else {
      base += left;
      lo = mid + 1;
    }
  }
  std::sort(c + lo, c + hi, Better<Candidate>);
  for (size_t i = lo; i < hi; ++i) {
    base += c[i].p;
    if (reaches(base)) {
      *mass = base;
      return i + 1;
    }
  }
  *mass = base;  // rounding: summed in another order, the range fell a hair short
  return hi;
}

}  // namespace

Xoshiro256::Xoshiro256(uint64_t seed) {
  uint64_t x = seed;
  for (uint64_t& s : s_) s = SplitMix64(&x);
}

uint64_t Xoshiro256::Next() {
  const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = Rotl(s_[3], 45);
  return result;
}

double Xoshiro256::NextDouble() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

Sampler::Sampler(const SamplingParams& params, uint64_t seed, const std::vector<int32_t>& prompt)
    : params_(params), rng_(seed) {
  if (params_.repetition_penalty != 1.0f) seen_.insert(prompt.begin(), prompt.end());
}

void Sampler::Accept(int32_t token) {
  if (params_.repetition_penalty != 1.0f) seen_.insert(token);
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f) {
    ++generated_count_[token];
  }
}

void Sampler::ApplyPenalties(float* logits, int vocab) const {
  const float r = params_.repetition_penalty;
  if (r != 1.0f) {
    for (int32_t id : seen_) {
      if (id < 0 || id >= vocab) continue;
      float& x = logits[id];
      x = x > 0 ? x / r : x * r;
    }
  }
  for (const auto& [id, count] : generated_count_) {
    if (id < 0 || id >= vocab) continue;
    logits[id] -= params_.presence_penalty + params_.frequency_penalty * static_cast<float>(count);
  }
}

int32_t Sampler::Sample(const float* logits, int vocab, TokenLogprob* logprob, int top_logprobs) {
  work_.assign(logits, logits + vocab);
  ApplyPenalties(work_.data(), vocab);
  int32_t chosen = 0;
  if (params_.temperature == 0.0f) {
    double best = Clean(work_[0]);
    for (int i = 1; i < vocab; ++i) {
      const double v = Clean(work_[i]);
      if (v > best) {  // strict: ties keep the lowest id
        best = v;
        chosen = i;
      }
    }
  } else {
    chosen = SampleFromDistribution(work_.data(), vocab);
  }
  if (logprob != nullptr) FillLogprobs(logits, vocab, chosen, top_logprobs, logprob);
  return chosen;
}

int32_t Sampler::SampleFromDistribution(const float* penalized, int vocab) {
  double m = -kInf;
  for (int i = 0; i < vocab; ++i) m = std::max(m, Clean(penalized[i]));
  if (m == -kInf) return 0;  // every id is masked: no distribution; answer as greedy would

  // Unnormalised probabilities with max 1; +inf logits take all the mass, shared equally. Ids with
  // p == 0 can never be drawn and are left out.
  const double temperature = params_.temperature;
  candidates_.clear();
  double mass = 0;
  for (int i = 0; i < vocab; ++i) {
    const double x = Clean(penalized[i]);
    const double p = m == kInf ? (x == kInf ? 1.0 : 0.0) : std::exp((x - m) / temperature);
    if (p > 0) {
      candidates_.push_back({p, i});
      mass += p;
    }
  }
  Candidate* c = candidates_.data();
  // The candidates are always c[0, n), a prefix (as a set) of the sorted order, of mass `mass`.
  size_t n = candidates_.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < n) {
    n = params_.top_k;
    std::nth_element(c, c + n, c + candidates_.size(), Better<Candidate>);
    mass = 0;
    for (size_t i = 0; i < n; ++i) mass += c[i].p;
  }
  if (params_.top_p < 1.0f) {
    n = PrefixReaching(c, n, static_cast<double>(params_.top_p) * mass, /*strict=*/false, &mass);
  }
  if (params_.min_p > 0.0f) {
    // The most probable id has p = 1 and survives every filter, so min_p * max p is just min_p;
    // the ids at or above it are a prefix of the sorted order.
    const double threshold = params_.min_p;
    const size_t kept =
        std::partition(c, c + n, [&](const Candidate& x) { return x.p >= threshold; }) - c;
    if (kept < n) {
      n = kept;
      mass = 0;
      for (size_t i = 0; i < n; ++i) mass += c[i].p;
    }
  }
  // Inverse CDF in sorted order: the first candidate whose cumulative mass exceeds u * mass.
  const double target = rng_.NextDouble() * mass;
  double unused_mass = 0;
  const size_t k = PrefixReaching(c, n, target, /*strict=*/true, &unused_mass);
  return c[k - 1].id;
}

void Sampler::FillLogprobs(const float* logits, int vocab, int32_t chosen, int top_logprobs,
                           TokenLogprob* out) {
  double m = -kInf;
  for (int i = 0; i < vocab; ++i) m = std::max(m, Clean(logits[i]));
  // log p(id) = x - logsumexp(x). With +inf logits the mass is shared among them; with none finite
  // nothing has probability.
  double lse = m;
  double num_inf = 0;
  if (std::isfinite(m)) {
    double s = 0;
    for (int i = 0; i < vocab; ++i) s += std::exp(Clean(logits[i]) - m);
    lse = m + std::log(s);
  } else if (m == kInf) {
    for (int i = 0; i < vocab; ++i) num_inf += logits[i] == kInf ? 1 : 0;
  }
  auto logprob = [&](int32_t id) -> float {
    const double x = Clean(logits[id]);
    if (std::isfinite(lse)) return static_cast<float>(x - lse);
    if (m == kInf && x == kInf) return static_cast<float>(-std::log(num_inf));
    return -std::numeric_limits<float>::infinity();
  };

  out->id = chosen;
  out->logprob = logprob(chosen);
  out->top.clear();
  const int n = std::clamp(top_logprobs, 0, vocab);
  if (n == 0) return;
  top_ids_.resize(vocab);
  std::iota(top_ids_.begin(), top_ids_.end(), 0);
  std::partial_sort(top_ids_.begin(), top_ids_.begin() + n, top_ids_.end(),
                    [logits](int32_t a, int32_t b) {
                      const double xa = Clean(logits[a]), xb = Clean(logits[b]);
                      return xa > xb || (xa == xb && a < b);
                    });
  out->top.reserve(n);
  for (int i = 0; i < n; ++i) out->top.emplace_back(top_ids_[i], logprob(top_ids_[i]));
}

}  // namespace needle::engine
