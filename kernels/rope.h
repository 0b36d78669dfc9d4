// Rotary position embedding, rotate-half convention (pairs i and i + d/2), in place on bf16 q and k
// heads. angle_i = float(pos) * inv_freq_i, inv_freq_i = theta^(-2i/d) rounded to fp32; the rotation
// itself runs in double, as kernels/reference/ops_ref.cc's ApplyRope does, before rounding to bf16
// (cos/sin are not rounded to bf16 first; see docs/conventions.md mismatch 11).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace needle::kernels {

struct RopeParams {
  int num_tokens = 0;
  int head_dim = 0;  // d, even
  double theta = 10000.0;
  // bf16 [num_tokens][q_stride]: head h at columns [h * head_dim, (h+1) * head_dim); nullptr: none.
  __nv_bfloat16* q = nullptr;
  int64_t q_stride = 0;
  int num_q_heads = 0;
  // bf16 [num_tokens][k_stride], num_k_heads heads laid out as q's; nullptr: none.
  __nv_bfloat16* k = nullptr;
  int64_t k_stride = 0;
  int num_k_heads = 0;
  // Absolute position of each token: int32 [num_tokens] or, with positions_int64, int64 [num_tokens].
  const void* positions = nullptr;
  bool positions_int64 = false;
};

cudaError_t LaunchRope(const RopeParams& params, cudaStream_t stream);

}  // namespace needle::kernels
