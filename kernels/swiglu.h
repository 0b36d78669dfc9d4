// SwiGLU activation of the MLP: y = silu(gate) * up, element-wise on bf16 with fp32 arithmetic. The
// gate and up inputs may be two halves of one fused projection output (hence the strides).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace needle::kernels {

struct SwiGluParams {
  int num_tokens = 0;
  int width = 0;                         // intermediate size
  const __nv_bfloat16* gate = nullptr;   // bf16 [num_tokens][gate_stride], first `width` columns
  int64_t gate_stride = 0;
  const __nv_bfloat16* up = nullptr;     // bf16 [num_tokens][up_stride]
  int64_t up_stride = 0;
  __nv_bfloat16* out = nullptr;          // bf16 [num_tokens][out_stride]; may equal gate
  int64_t out_stride = 0;
};

cudaError_t LaunchSwiGlu(const SwiGluParams& params, cudaStream_t stream);

}  // namespace needle::kernels
