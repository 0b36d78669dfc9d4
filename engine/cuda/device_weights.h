// The model's weights on the device: every tensor of a ModelWeights rounded to bf16 (round to nearest
// even, so bf16-exact presets arrive bit-identical) and copied into one cudaMalloc arena, each tensor
// 256-byte aligned for cuBLASLt. The MLP's gate and up projections are stored stacked, [2I][hidden],
// so one GEMM produces both. Also the check that refuses a model the kernels cannot run, at load.
// Owns only the weights' device memory; never the caches or activations.
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/cuda/device_memory.h"
#include "engine/model_config.h"
#include "engine/weights.h"

namespace needle::engine::cuda {

using bf16 = __nv_bfloat16;

// One layer's device tensors (PyTorch layout [out][in]); nullptr where the architecture has none.
struct DeviceLayer {
  const bf16* attn_norm = nullptr;  // [hidden]
  const bf16* q_proj = nullptr;     // [H*d_k][hidden]
  const bf16* q_bias = nullptr;     // [H*d_k] (qkv_bias)
  const bf16* g_proj = nullptr;     // [3H][hidden] (NSA)
  // K/V projections per branch (Branch order cmp, slc, win). Shared-K/V architectures and llama have
  // only the selection one (k_proj/v_proj); nsa-paper has all three.
  const bf16* k_proj[3] = {nullptr, nullptr, nullptr};  // [H_kv*d_k][hidden]
  const bf16* v_proj[3] = {nullptr, nullptr, nullptr};  // [H_kv*d_v][hidden]
  const bf16* k_bias = nullptr;     // [H_kv*d_k] (qkv_bias, selection branch)
  const bf16* v_bias = nullptr;     // [H_kv*d_v]
  const bf16* o_proj = nullptr;     // [hidden][H*d_v]
  // nsa-paper compression MLP.
  const bf16* cmp_k_pos = nullptr;  // [l][d_k]
  const bf16* cmp_k_fc1 = nullptr;  // [hidden_c][l*d_k]
  const bf16* cmp_k_fc2 = nullptr;  // [d_k][hidden_c]
  const bf16* cmp_v_pos = nullptr;  // [l][d_v]
  const bf16* cmp_v_fc1 = nullptr;  // [hidden_c][l*d_v]
  const bf16* cmp_v_fc2 = nullptr;  // [d_v][hidden_c]
  const bf16* mlp_norm = nullptr;   // [hidden]
  const bf16* gate_up = nullptr;    // [2I][hidden]: rows 0..I-1 gate_proj, I..2I-1 up_proj
  const bf16* down_proj = nullptr;  // [hidden][I]
};

class DeviceWeights {
 public:
  // Rounds and uploads every tensor the config uses. INVALID_ARGUMENT when a tensor's size does not
  // match the config; RESOURCE_EXHAUSTED / INTERNAL for device failures. Synchronous.
  static absl::StatusOr<std::unique_ptr<DeviceWeights>> Upload(const ModelWeights& weights);

  const bf16* embed() const { return embed_; }         // [vocab][hidden]
  const bf16* final_norm() const { return final_norm_; }  // [hidden]
  const bf16* lm_head() const { return lm_head_; }     // [vocab][hidden] (the embedding when tied)
  const DeviceLayer& layer(int i) const { return layers_[i]; }
  size_t bytes() const { return arena_.bytes(); }

 private:
  DeviceWeights() = default;

  DeviceBuffer arena_;
  const bf16* embed_ = nullptr;
  const bf16* final_norm_ = nullptr;
  const bf16* lm_head_ = nullptr;
  std::vector<DeviceLayer> layers_;
};

// Whether the CUDA kernels can run this model: head dims and group size instantiated in the attention
// kernels, the compression MLP's staging fits on chip, no fla-org chunked top-k merge that differs
// from exact top-n, even head dims for RoPE. UNIMPLEMENTED naming the reason otherwise. Host only.
absl::Status CheckModelSupported(const ModelConfig& model);

// Bytes of bf16 weights the model takes on the device (an estimate for sizing the KV pools).
int64_t DeviceWeightBytes(const ModelConfig& model);

}  // namespace needle::engine::cuda
