// Token embedding lookup: gathers rows of a bf16 embedding table into the activation buffer. Owns
// nothing but the copy; ids are validated by the engine, and an id outside [0, vocab) yields a row of
// zeros rather than an out-of-bounds read.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace needle::kernels {

struct EmbeddingParams {
  int num_tokens = 0;
  int vocab = 0;
  int hidden = 0;
  const int32_t* token_ids = nullptr;     // int32 [num_tokens]
  const __nv_bfloat16* table = nullptr;   // bf16 [vocab][hidden]
  __nv_bfloat16* out = nullptr;           // bf16 [num_tokens][out_stride], first `hidden` columns
  int64_t out_stride = 0;
};

cudaError_t LaunchEmbedding(const EmbeddingParams& params, cudaStream_t stream);

}  // namespace needle::kernels
