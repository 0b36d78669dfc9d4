// RMSNorm over the feature dimension of bf16 activations: y = x * rsqrt(mean(x^2) + eps) * w, with
// fp32 arithmetic. Optionally gathers rows (the final norm of a prefill only needs each sequence's
// last token). Owns no state; may run in place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace needle::kernels {

struct RmsNormParams {
  int num_rows = 0;  // output rows
  int hidden = 0;
  float eps = 1e-6f;
  const __nv_bfloat16* x = nullptr;       // bf16 [input rows][x_stride]
  int64_t x_stride = 0;
  const __nv_bfloat16* weight = nullptr;  // bf16 [hidden]
  // int32 [num_rows]: output row r normalises input row row_index[r]; nullptr: input row r.
  const int32_t* row_index = nullptr;
  __nv_bfloat16* y = nullptr;  // bf16 [num_rows][y_stride]; may equal x when row_index is null
  int64_t y_stride = 0;
};

cudaError_t LaunchRmsNorm(const RmsNormParams& params, cudaStream_t stream);

}  // namespace needle::kernels
