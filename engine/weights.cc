// The per-architecture tensor lists. Names follow each architecture's training code
// (docs/conventions.md); nsa-paper's names are needle's own.
#include "engine/weights.h"

#include "absl/strings/str_cat.h"

namespace needle::engine {

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<TensorSpec> TensorSpecs(const ModelConfig& c) {
  std::vector<TensorSpec> specs;
  const int64_t D = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  const int64_t H = c.num_heads, Hkv = c.num_kv_heads, dk = c.head_dim_qk, dv = c.head_dim_v;
  const bool fla = c.arch == Architecture::kNsa;
  auto add = [&](std::string name, std::vector<int64_t> shape, std::function<Tensor&(ModelWeights&)> slot) {
    specs.push_back(TensorSpec{std::move(name), std::move(shape), std::move(slot)});
  };

  add(fla ? "model.embeddings.weight" : "model.embed_tokens.weight", {V, D},
      [](ModelWeights& w) -> Tensor& { return w.embed; });
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    const std::string attn = p + (fla ? "attn." : "self_attn.");
    auto L = [i](auto member) {
      return [i, member](ModelWeights& w) -> Tensor& { return w.layers[i].*member; };
    };
    add(p + (fla ? "attn_norm.weight" : "input_layernorm.weight"), {D}, L(&LayerWeights::attn_norm));
    add(attn + "q_proj.weight", {H * dk, D}, L(&LayerWeights::q_proj));
    if (c.qkv_bias) add(attn + "q_proj.bias", {H * dk}, L(&LayerWeights::q_bias));
    if (c.arch == Architecture::kNsaPaper) {
      static const char* kBranchNames[3] = {"cmp", "slc", "win"};
      for (int b = 0; b < 3; ++b) {
        add(absl::StrCat(attn, kBranchNames[b], "_k_proj.weight"), {Hkv * dk, D},
            [i, b](ModelWeights& w) -> Tensor& { return w.layers[i].branch_k_proj[b]; });
        add(absl::StrCat(attn, kBranchNames[b], "_v_proj.weight"), {Hkv * dv, D},
            [i, b](ModelWeights& w) -> Tensor& { return w.layers[i].branch_v_proj[b]; });
      }
      const int64_t l = c.nsa.cmp_block, hc = c.nsa.cmp_mlp_hidden;
      add(attn + "compress_k.pos_emb", {l, dk}, L(&LayerWeights::cmp_k_pos));
      add(attn + "compress_k.fc1.weight", {hc, l * dk}, L(&LayerWeights::cmp_k_fc1));
      add(attn + "compress_k.fc2.weight", {dk, hc}, L(&LayerWeights::cmp_k_fc2));
      add(attn + "compress_v.pos_emb", {l, dv}, L(&LayerWeights::cmp_v_pos));
      add(attn + "compress_v.fc1.weight", {hc, l * dv}, L(&LayerWeights::cmp_v_fc1));
      add(attn + "compress_v.fc2.weight", {dv, hc}, L(&LayerWeights::cmp_v_fc2));
    } else {
      add(attn + "k_proj.weight", {Hkv * dk, D}, L(&LayerWeights::k_proj));
      if (c.qkv_bias) add(attn + "k_proj.bias", {Hkv * dk}, L(&LayerWeights::k_bias));
      add(attn + "v_proj.weight", {Hkv * dv, D}, L(&LayerWeights::v_proj));
      if (c.qkv_bias) add(attn + "v_proj.bias", {Hkv * dv}, L(&LayerWeights::v_bias));
    }
    if (c.IsNsa()) add(attn + "g_proj.weight", {3 * H, D}, L(&LayerWeights::g_proj));
    add(attn + "o_proj.weight", {D, H * dv}, L(&LayerWeights::o_proj));
    add(p + (fla ? "mlp_norm.weight" : "post_attention_layernorm.weight"), {D}, L(&LayerWeights::mlp_norm));
    add(p + "mlp.gate_proj.weight", {I, D}, L(&LayerWeights::gate_proj));
    add(p + "mlp.up_proj.weight", {I, D}, L(&LayerWeights::up_proj));
    add(p + "mlp.down_proj.weight", {D, I}, L(&LayerWeights::down_proj));
  }
  add("model.norm.weight", {D}, [](ModelWeights& w) -> Tensor& { return w.final_norm; });
  if (!c.tie_word_embeddings) {
    add("lm_head.weight", {V, D}, [](ModelWeights& w) -> Tensor& { return w.lm_head; });
  }
  return specs;
}

}  // namespace needle::engine
