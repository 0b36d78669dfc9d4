// Naive CPU reference of token sampling with the random number u supplied by the caller, and of the
// log-softmax used for logprobs. Semantics are engine/sampler.h's (penalties, greedy, temperature,
// top-k, top-p, min-p, draw walking candidates by descending probability, ties to the lower id);
// written independently of it, with a full sort, so that it can check both the engine's sampler and
// the GPU kernel (kernels/sampling.h). No PRNG and no request state here.
#pragma once

#include <cstdint>
#include <vector>

namespace needle::kernels::reference {

struct SamplingRowRef {
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int top_k = 0;
};

// An id seen in the prompt or generated, and how many times it was generated (0: prompt only).
struct PenaltyEntryRef {
  int32_t id = 0;
  int32_t count = 0;
};

// In place on logits [vocab], fp32 arithmetic: repetition penalty r over every listed id
// (x > 0 ? x / r : x * r), then x -= presence + frequency * count for generated ids. Each entry
// applies once; ids outside [0, vocab) are ignored.
void ApplyPenaltiesRef(const SamplingRowRef& row, const std::vector<PenaltyEntryRef>& history, float* logits,
                       int vocab);

// The candidates the draw walks, best first, after every filter, with their unnormalised
// probabilities (max 1). Empty for greedy rows and rows with no finite or +inf logit.
struct CandidatesRef {
  std::vector<int32_t> ids;
  std::vector<double> p;
  double mass = 0;  // sum of p
};
CandidatesRef SamplingCandidatesRef(const SamplingRowRef& row, const float* penalized, int vocab);

// The token picked for random number u in [0, 1): penalties, then greedy or the filtered draw.
int32_t SampleRef(const SamplingRowRef& row, const std::vector<PenaltyEntryRef>& history, const float* logits,
                  int vocab, double u);

// log p of every id from raw logits [vocab], computed in double (NaN as -inf; +inf logits share the
// mass; no finite or +inf logit: all -inf).
void LogSoftmaxRef(const float* logits, int vocab, float* out);

}  // namespace needle::kernels::reference
