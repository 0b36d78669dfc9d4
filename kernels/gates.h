// NSA branch gates: the sigmoid of the g_proj logits, and the gated sum of the three branch outputs
// (compressed, selected, window) that feeds o_proj. Gate order per head is (cmp, slc, win), the rows
// 3h, 3h+1, 3h+2 of g_proj. Owns only these two element-wise steps; the branches are the attention
// kernels' business.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace needle::kernels {

struct GateSigmoidParams {
  int num_tokens = 0;
  int num_heads = 0;                      // H
  const __nv_bfloat16* logits = nullptr;  // bf16 [num_tokens][logits_stride], first 3*H columns
  int64_t logits_stride = 0;
  float* gates = nullptr;                 // fp32 [num_tokens][H][3], contiguous
};

cudaError_t LaunchGateSigmoid(const GateSigmoidParams& params, cudaStream_t stream);

struct GatedCombineParams {
  int num_tokens = 0;
  int num_heads = 0;  // H
  int head_dim = 0;   // d_v
  const float* gates = nullptr;  // fp32 [num_tokens][H][3], already sigmoided
  // Branch outputs in gate order (cmp, slc, win), each bf16 [num_tokens][branch_stride[b]] with head
  // h at columns [h * head_dim, (h+1) * head_dim). nullptr: the branch contributes nothing (for
  // instance a model without a window branch).
  const __nv_bfloat16* branch[3] = {nullptr, nullptr, nullptr};
  int64_t branch_stride[3] = {0, 0, 0};
  __nv_bfloat16* out = nullptr;  // bf16 [num_tokens][out_stride], heads as in the branches
  int64_t out_stride = 0;
};

// out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, in fp32, rounded once to bf16.
cudaError_t LaunchGatedCombine(const GatedCombineParams& params, cudaStream_t stream);

}  // namespace needle::kernels
