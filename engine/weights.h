// Host-side model weights in fp32 and the per-architecture list of checkpoint tensors (names and
// shapes). The list is the single source of truth shared by the checkpoint loader, the checkpoint
// writer and the synthetic presets; executors copy from ModelWeights into their own layouts.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/model_config.h"

namespace needle::engine {

// A dense row-major fp32 tensor. Linear layers are stored as in PyTorch: [out_features, in_features].
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;

  int64_t numel() const;
  bool empty() const { return data.empty(); }
  const float* ptr() const { return data.data(); }
  float* ptr() { return data.data(); }
};

// Branch index for nsa-paper's independent K/V projections, in gate order.
enum Branch : int { kCmp = 0, kSlc = 1, kWin = 2 };

struct LayerWeights {
  Tensor attn_norm;  // [hidden]
  Tensor q_proj;     // [H*d_k, hidden]
  Tensor q_bias;     // [H*d_k] when qkv_bias
  Tensor k_proj;     // [H_kv*d_k, hidden] shared-K/V architectures and llama
  Tensor k_bias;     // [H_kv*d_k] when qkv_bias
  Tensor v_proj;     // [H_kv*d_v, hidden]
  Tensor v_bias;     // [H_kv*d_v] when qkv_bias
  Tensor g_proj;     // [3*H, hidden] NSA gates, rows 3h..3h+2 = (cmp, slc, win)
  Tensor o_proj;     // [hidden, H*d_v]
  // nsa-paper: independent K/V per branch, indexed by Branch.
  Tensor branch_k_proj[3];  // [H_kv*d_k, hidden]
  Tensor branch_v_proj[3];  // [H_kv*d_v, hidden]
  // nsa-paper compression MLP, one for keys and one for values, shared by the KV heads:
  // phi(X) = fc2 · silu(fc1 · flatten(X + pos)), X the block's l pre-RoPE rows of one KV head.
  Tensor cmp_k_pos, cmp_v_pos;  // [l, d_k], [l, d_v]
  Tensor cmp_k_fc1, cmp_v_fc1;  // [hidden_c, l*d_k], [hidden_c, l*d_v]
  Tensor cmp_k_fc2, cmp_v_fc2;  // [d_k, hidden_c], [d_v, hidden_c]
  Tensor mlp_norm;   // [hidden]
  Tensor gate_proj;  // [intermediate, hidden]
  Tensor up_proj;    // [intermediate, hidden]
  Tensor down_proj;  // [hidden, intermediate]
};

struct ModelWeights {
  ModelConfig config;
  Tensor embed;       // [vocab, hidden]
  std::vector<LayerWeights> layers;
  Tensor final_norm;  // [hidden]
  Tensor lm_head;     // [vocab, hidden]; empty when tie_word_embeddings (use embed)

  const Tensor& LmHead() const { return config.tie_word_embeddings ? embed : lm_head; }
};

// One tensor a checkpoint of the given config must (or may) hold.
struct TensorSpec {
  std::string name;            // checkpoint name, e.g. "model.layers.3.attn.q_proj.weight"
  std::vector<int64_t> shape;  // expected shape
  // Where it lives in ModelWeights (layers must already be sized to config.num_layers).
  std::function<Tensor&(ModelWeights&)> slot;
};

// Every tensor of the architecture, in a stable order (embedding, layers, final norm, head).
std::vector<TensorSpec> TensorSpecs(const ModelConfig& config);

}  // namespace needle::engine
