// Token sampling on the device, with the exact semantics of engine/sampler.h so that, for the same
// random number u, the CPU sampler and this kernel pick the same token:
//   1. penalties on a copy of the logits (repetition over every listed id, presence/frequency over
//      the generated count);
//   2. temperature 0: argmax, ties to the lowest id;
//   3. otherwise p = exp((x - max) / T) in double over the ids in descending order (ties: lower id
//      first), top_k, then top_p (smallest prefix with mass >= top_p of the remaining mass), then
//      min_p (p >= min_p * max p), and the first candidate whose cumulative mass exceeds u * mass.
// NaN logits count as -inf. The host supplies u (one per row) and the token history; this file owns
// neither a PRNG nor any per-request state. Also: log-softmax of the raw logits, for logprobs.
//
// The walk in descending order is done without sorting: each "first element whose cumulative weight
// crosses a target" is a radix descent over the logits' order-preserving bit patterns (4 passes of
// 8 bits, per-bin weight histograms), one thread block per row.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace needle::kernels {

// Per-row sampling parameters (host-packed, device array), as in engine::SamplingParams.
struct SamplingRow {
  float temperature = 1.0f;         // >= 0; 0 = greedy
  float top_p = 1.0f;               // (0, 1]
  float min_p = 0.0f;               // [0, 1]
  float repetition_penalty = 1.0f;  // > 0; 1 = off
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t top_k = 0;                // 0 = off
  int32_t reserved = 0;
  double uniform = 0.0;             // the row's random number u in [0, 1)
};

struct SampleParams {
  int batch = 0;
  int vocab = 0;
  const float* logits = nullptr;  // fp32 [batch][logits_stride], raw (not modified)
  int64_t logits_stride = 0;
  const SamplingRow* rows = nullptr;  // [batch]
  // Penalty history, CSR over rows (all nullptr: no penalties). Row b owns entries
  // [penalty_offsets[b], penalty_offsets[b+1]); each entry is an id seen in the prompt or generated
  // (unique within the row) and the number of times it was generated (0: prompt only).
  const int32_t* penalty_offsets = nullptr;  // int32 [batch + 1]
  const int32_t* penalty_ids = nullptr;      // int32 [nnz], ids outside [0, vocab) are ignored
  const int32_t* penalty_counts = nullptr;   // int32 [nnz]
  int32_t* tokens = nullptr;                 // int32 [batch], out
};

// Workspace for LaunchSample: the penalised logits, fp32 [batch][vocab].
size_t SampleWorkspaceBytes(int batch, int vocab);

cudaError_t LaunchSample(const SampleParams& params, void* workspace, cudaStream_t stream);

struct LogSoftmaxParams {
  int batch = 0;
  int vocab = 0;
  const float* logits = nullptr;  // fp32 [batch][logits_stride], raw logits
  int64_t logits_stride = 0;
  float* out = nullptr;           // fp32 [batch][out_stride]: log p; may equal logits
  int64_t out_stride = 0;
};

// log-softmax in double, as engine::Sampler's logprobs: NaN counts as -inf; with +inf logits the
// mass is shared equally among them; with no finite or +inf logit every entry is -inf.
cudaError_t LaunchLogSoftmax(const LogSoftmaxParams& params, cudaStream_t stream);

}  // namespace needle::kernels
