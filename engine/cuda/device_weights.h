// The model's weights on the device: every tensor of a ModelWeights rounded to bf16 (round to nearest
// even, so bf16-exact presets arrive bit-identical) and copied into one cudaMalloc arena, each tensor
// 256-byte aligned for cuBLASLt. The MLP's gate and up projections are stored stacked, [2I][hidden],
// so one GEMM produces both; likewise the attention's small input projections besides q (gate logits
// and branch K/V, FusedProjection). Also the check that refuses a model the kernels cannot run, at load.
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

// Where the fused input projection puts each of its parts in an output row; the same for every layer.
// g_proj and the K/V projections of the branches the executor uses all read the normalised input
// (like q_proj, which stays apart: the attention kernels read q as contiguous [H][d_k] rows). Alone
// they are up to seven GEMMs of 192..768 outputs, too few CTAs each to get near the memory bandwidth
// (~250 GB/s measured, docs/perf-notes.md); stored back to back as one [width][hidden] matrix they are
// one GEMM, y = xn · W^T, whose [tokens][width] rows hold every part side by side. Each part starts at
// a multiple of 8 columns (zero weight rows pad the one before it), so that every part's rows start
// 16-byte aligned in a row-major output whose stride is `width`, as cuBLASLt and the attention
// kernels' 16-byte copies want. Column -1: the model has no such part.
//
// Order: gate logits, then the keys of the selection and window branches next to each other (one
// RoPE launch covers both when d_k*H_kv is a multiple of 8, so no padding separates them), the
// values of those two, then the compression branch's pre-RoPE keys and values.
struct FusedProjection {
  int64_t width = 0;              // output columns = weight rows, padding included; a multiple of 8
  int64_t gate = -1;              // g_proj's 3H logits (NSA)
  int64_t k[3] = {-1, -1, -1};    // branch b's H_kv*d_k keys (Branch order cmp, slc, win)
  int64_t v[3] = {-1, -1, -1};    // branch b's H_kv*d_v values
  int64_t padding = 0;            // zero rows between the parts (width minus the parts' rows)

  // The fused matrix of `model`: the selection branch (the shared K/V, or llama's), the window branch
  // when it has a ring of its own (independent K/V, w > 0), the compression branch when the MLP
  // compresses its own pre-RoPE K/V (independent K/V), and the gates of an NSA model.
  static FusedProjection For(const ModelConfig& model);
};

// One layer's device tensors (PyTorch layout [out][in]); nullptr where the architecture has none.
struct DeviceLayer {
  const bf16* attn_norm = nullptr;  // [hidden]
  const bf16* q_proj = nullptr;     // [H*d_k][hidden]
  const bf16* q_bias = nullptr;     // [H*d_k] (qkv_bias)
  // The fused input projection, [width][hidden] (FusedProjection), and its bias [width]: zero but for
  // the selection K/V biases; nullptr when there are none (no qkv_bias, or independent branch K/V,
  // whose projections carry none). g_proj, k_proj[b], v_proj[b], k_bias and v_bias point into them:
  // their rows (elements) at the parts' columns.
  const bf16* fused_proj = nullptr;
  const bf16* fused_bias = nullptr;
  const bf16* g_proj = nullptr;     // [3H][hidden] (NSA), inside fused_proj
  // K/V projections per branch (Branch order cmp, slc, win). Shared-K/V architectures and llama have
  // only the selection one (k_proj/v_proj); nsa-paper has all three. Inside fused_proj when the
  // FusedProjection has the branch, else (a branch the executor never reads) a tensor of its own.
  const bf16* k_proj[3] = {nullptr, nullptr, nullptr};  // [H_kv*d_k][hidden]
  const bf16* v_proj[3] = {nullptr, nullptr, nullptr};  // [H_kv*d_v][hidden]
  const bf16* k_bias = nullptr;     // [H_kv*d_k] (qkv_bias, selection branch), inside fused_bias
  const bf16* v_bias = nullptr;     // [H_kv*d_v], inside fused_bias
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
  const FusedProjection& fused_projection() const { return fused_; }
  size_t bytes() const { return arena_.bytes(); }

 private:
  DeviceWeights() = default;

  DeviceBuffer arena_;
  const bf16* embed_ = nullptr;
  const bf16* final_norm_ = nullptr;
  const bf16* lm_head_ = nullptr;
  FusedProjection fused_;
  std::vector<DeviceLayer> layers_;
};

// Whether the CUDA kernels can run this model: head dims and group size instantiated in the attention
// kernels, the compression MLP's staging fits on chip, no fla-org chunked top-k merge that differs
// from exact top-n, even head dims for RoPE, an MLP compression with K/V projections of its own.
// UNIMPLEMENTED naming the reason otherwise. Host only.
absl::Status CheckModelSupported(const ModelConfig& model);

// Bytes of bf16 weights the model takes on the device, for sizing the KV pools: the checkpoint's
// tensors plus the fused projection's padding rows (and padded bias), plus each tensor's alignment in
// the arena at most. An upper bound on DeviceWeights::bytes(), by at most the alignment.
int64_t DeviceWeightBytes(const ModelConfig& model);

}  // namespace needle::engine::cuda
