// Sampler: turns one row of logits into the next token of one request, with the request's penalties,
// temperature, top-k/top-p/min-p filters and its own random stream, and reports log-probabilities.
// It owns the request's PRNG and the token history the penalties need; it knows nothing of batches,
// devices or stop conditions. Given the same parameters, seed, prompt and logits it picks the same
// tokens: the PRNG and the draw rule are fully specified here (no std distributions), so a seed means
// the same stream on every platform; a pick can differ only where a rounding difference (libm's exp,
// summation order) moves a probability across a cut or the drawn point.
//
// One step, in order:
//   1. Penalties on a copy of the logits (ApplyPenalties):
//        repetition_penalty r, over every id in the prompt or generated so far (once per id):
//          logit > 0 ? logit / r : logit * r;
//        presence_penalty a and frequency_penalty f, over generated ids only, c = times generated:
//          logit -= a (if c > 0) + f * c.
//   2. temperature == 0: the argmax of the penalised logits (ties: the lowest id); no random draw.
//   3. Otherwise p = softmax(logits / temperature), in double with the maximum subtracted; then
//        top_k > 0: keep the k most probable ids (ties: lower id first);
//        top_p < 1: of those, renormalised, keep the smallest most-probable prefix whose mass >= top_p;
//        min_p > 0: drop ids with p < min_p * max p;
//      renormalise, draw u in [0, 1) (exactly one Xoshiro256::NextDouble() per step) and walk the
//      candidates by descending probability (ties: lower id first), picking the first whose
//      cumulative mass exceeds u. Ids with p == 0 (for instance -inf logits) are never candidates;
//      +inf logits share all the mass equally; if every logit is -inf, id 0 is returned.
//   Logprobs are the log-softmax of the RAW logits (before penalties and temperature).
//
// NaN logits are treated as -inf. Cost per step: expected O(vocab). top_p and the draw find where the
// cumulative mass crosses its target by bisecting with selection (nth_element) instead of sorting,
// so no step sorts more than a few dozen candidates; the result is the one the sorted walk gives.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "engine/request.h"

namespace needle::engine {

// xoshiro256** (Blackman and Vigna, 2018), seeded through splitmix64 so that any 64-bit seed, 0
// included, gives a well-mixed nonzero state.
class Xoshiro256 {
 public:
  explicit Xoshiro256(uint64_t seed);
  uint64_t Next();
  // Uniform in [0, 1): the top 53 bits of Next() scaled by 2^-53.
  double NextDouble();

 private:
  uint64_t s_[4];
};

class Sampler {
 public:
  // `params` must have passed Validate(). `seed` is the request's seed (or one the engine chose).
  Sampler(const SamplingParams& params, uint64_t seed, const std::vector<int32_t>& prompt);

  // Picks the next token from `logits` [vocab], vocab >= 1. When `logprob` is not null, fills it with the chosen
  // id's log-probability and the `top_logprobs` most likely ids (descending, ties: lower id first).
  // Does not record the token: call Accept() with the token the request actually keeps.
  int32_t Sample(const float* logits, int vocab, TokenLogprob* logprob, int top_logprobs);

  // Records a generated token for the penalties.
  void Accept(int32_t token);

  // Step 1 above, in place on logits [vocab]; ids outside [0, vocab) in the history are ignored.
  void ApplyPenalties(float* logits, int vocab) const;

 private:
  // A candidate of the random draw: its unnormalised probability (max 1) and id.
  struct Candidate {
    double p;
    int32_t id;
  };

  int32_t SampleFromDistribution(const float* penalized, int vocab);
  void FillLogprobs(const float* logits, int vocab, int32_t chosen, int top_logprobs,
                    TokenLogprob* out);

  SamplingParams params_;
  Xoshiro256 rng_;
  std::unordered_set<int32_t> seen_;                  // prompt and generated ids (repetition)
  std::unordered_map<int32_t, int> generated_count_;  // generated ids (presence, frequency)

  // Per-step scratch, reused to avoid allocating per token.
  std::vector<float> work_;             // penalised logits
  std::vector<Candidate> candidates_;   // ids with p > 0
  std::vector<int32_t> top_ids_;        // logprob ranking
};

}  // namespace needle::engine
