// Weight upload and the model support check; see device_weights.h.
#include "engine/cuda/device_weights.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/bf16.h"
#include "kernels/compress.h"
#include "kernels/dense_attention.h"
#include "kernels/nsa_decode.h"
#include "kernels/nsa_prefill.h"

namespace needle::engine::cuda {
namespace {

constexpr size_t kTensorAlign = 256;

// One tensor to upload: `parts` host tensors stored back to back (gate_up has two), and where the
// device pointer goes once the arena exists.
struct PendingTensor {
  std::string name;
  std::vector<const Tensor*> parts;
  int64_t numel = 0;  // expected total elements
  const bf16** slot = nullptr;
  size_t offset = 0;  // bytes into the arena
};

}  // namespace

absl::Status CheckModelSupported(const ModelConfig& m) {
  auto no = [&](const std::string& why) {
    return absl::UnimplementedError(absl::StrCat("the CUDA executor cannot run this ", ArchitectureName(m.arch),
                                                 " model: ", why));
  };
  if (m.num_kv_heads <= 0 || m.num_heads % m.num_kv_heads != 0) return no("num_heads must be a multiple of num_kv_heads");
  const int G = m.GroupSize();
  if (m.head_dim_qk % 2 != 0) return no(absl::StrCat("RoPE needs an even head_dim, got ", m.head_dim_qk));
  if (m.IsNsa()) {
    if (!kernels::NsaDecodeSupported(m.head_dim_qk, m.head_dim_v, G) ||
        !kernels::NsaPrefillSupported(m.head_dim_qk, m.head_dim_v, G)) {
      return no(absl::StrCat("the NSA attention kernels are not built for d_k = ", m.head_dim_qk, ", d_v = ",
                             m.head_dim_v, ", group size ", G,
                             " (built: 64/64, 128/128, 192/128, 192/192, 16/16, 32/32, 24/16; group sizes 1..64)"));
    }
    const NsaParams& n = m.nsa;
    if (n.compression == Compression::kMlpPreRope &&
        !kernels::CompressMlpSupported(n.cmp_block, m.head_dim_qk, m.head_dim_v)) {
      return no(absl::StrCat("the compression MLP cannot stage a block of ", n.cmp_block, " rows of width ",
                             std::max(m.head_dim_qk, m.head_dim_v), " on chip"));
    }
  } else if (!kernels::DenseAttentionSupported(m.head_dim_qk, m.head_dim_v, G)) {
    return no(absl::StrCat("the dense attention kernel is not built for d_k = ", m.head_dim_qk, ", d_v = ",
                           m.head_dim_v, ", group size ", G));
  }
  return absl::OkStatus();
}

int64_t DeviceWeightBytes(const ModelConfig& model) {
  int64_t elems = 0;
  for (const TensorSpec& spec : TensorSpecs(model)) {
    int64_t n = 1;
    for (int64_t d : spec.shape) n *= d;
    elems += n;
  }
  return elems * static_cast<int64_t>(sizeof(bf16));
}

absl::StatusOr<std::unique_ptr<DeviceWeights>> DeviceWeights::Upload(const ModelWeights& w) {
  const ModelConfig& c = w.config;
  std::unique_ptr<DeviceWeights> dw(new DeviceWeights());
  dw->layers_.resize(c.num_layers);
  const int64_t D = c.hidden_size, H = c.num_heads, Hkv = c.num_kv_heads, dk = c.head_dim_qk, dv = c.head_dim_v;
  const int64_t I = c.intermediate_size;
  const bool nsa = c.IsNsa();
  const bool shared = !nsa || c.nsa.shared_kv;
  const bool mlp_cmp = nsa && c.nsa.compression == Compression::kMlpPreRope;

  std::vector<PendingTensor> uploads;
  auto add = [&](std::string name, std::vector<const Tensor*> parts, int64_t numel, const bf16** slot) {
    uploads.push_back(PendingTensor{std::move(name), std::move(parts), numel, slot, 0});
  };
  add("embed", {&w.embed}, c.vocab_size * D, &dw->embed_);
  add("final_norm", {&w.final_norm}, D, &dw->final_norm_);
  if (!c.tie_word_embeddings) add("lm_head", {&w.lm_head}, c.vocab_size * D, &dw->lm_head_);
  if (static_cast<int>(w.layers.size()) != c.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights have ", w.layers.size(), " layers, the config says ", c.num_layers));
  }
  for (int i = 0; i < c.num_layers; ++i) {
    const LayerWeights& L = w.layers[i];
    DeviceLayer& d = dw->layers_[i];
    const std::string p = absl::StrCat("layer ", i, " ");
    add(p + "attn_norm", {&L.attn_norm}, D, &d.attn_norm);
    add(p + "q_proj", {&L.q_proj}, H * dk * D, &d.q_proj);
    if (c.qkv_bias) add(p + "q_bias", {&L.q_bias}, H * dk, &d.q_bias);
    if (nsa) add(p + "g_proj", {&L.g_proj}, 3 * H * D, &d.g_proj);
    if (shared) {
      add(p + "k_proj", {&L.k_proj}, Hkv * dk * D, &d.k_proj[kSlc]);
      add(p + "v_proj", {&L.v_proj}, Hkv * dv * D, &d.v_proj[kSlc]);
      if (c.qkv_bias) {
        add(p + "k_bias", {&L.k_bias}, Hkv * dk, &d.k_bias);
        add(p + "v_bias", {&L.v_bias}, Hkv * dv, &d.v_bias);
      }
    } else {
      for (int b = 0; b < 3; ++b) {
        add(absl::StrCat(p, "branch ", b, " k_proj"), {&L.branch_k_proj[b]}, Hkv * dk * D, &d.k_proj[b]);
        add(absl::StrCat(p, "branch ", b, " v_proj"), {&L.branch_v_proj[b]}, Hkv * dv * D, &d.v_proj[b]);
      }
    }
    add(p + "o_proj", {&L.o_proj}, D * H * dv, &d.o_proj);
    if (mlp_cmp) {
      const int64_t l = c.nsa.cmp_block, hc = c.nsa.cmp_mlp_hidden;
      add(p + "cmp_k_pos", {&L.cmp_k_pos}, l * dk, &d.cmp_k_pos);
      add(p + "cmp_k_fc1", {&L.cmp_k_fc1}, hc * l * dk, &d.cmp_k_fc1);
      add(p + "cmp_k_fc2", {&L.cmp_k_fc2}, dk * hc, &d.cmp_k_fc2);
      add(p + "cmp_v_pos", {&L.cmp_v_pos}, l * dv, &d.cmp_v_pos);
      add(p + "cmp_v_fc1", {&L.cmp_v_fc1}, hc * l * dv, &d.cmp_v_fc1);
      add(p + "cmp_v_fc2", {&L.cmp_v_fc2}, dv * hc, &d.cmp_v_fc2);
    }
    add(p + "mlp_norm", {&L.mlp_norm}, D, &d.mlp_norm);
    add(p + "gate_proj+up_proj", {&L.gate_proj, &L.up_proj}, 2 * I * D, &d.gate_up);
    add(p + "down_proj", {&L.down_proj}, D * I, &d.down_proj);
  }

  size_t total = 0, largest = 0;
  for (PendingTensor& u : uploads) {
    int64_t have = 0;
    for (const Tensor* t : u.parts) have += static_cast<int64_t>(t->data.size());
    if (have != u.numel) {
      return absl::InvalidArgumentError(
          absl::StrCat("weight ", u.name, " has ", have, " elements, the config needs ", u.numel));
    }
    u.offset = total;
    total += (static_cast<size_t>(u.numel) * sizeof(bf16) + kTensorAlign - 1) / kTensorAlign * kTensorAlign;
    largest = std::max(largest, static_cast<size_t>(u.numel));
  }
  if (absl::Status s = dw->arena_.Allocate(total, "the model weights"); !s.ok()) return s;

  std::vector<uint16_t> host(largest);
  char* arena = dw->arena_.as<char>();
  for (const PendingTensor& u : uploads) {
    size_t n = 0;
    for (const Tensor* t : u.parts) {
      for (float f : t->data) host[n++] = FloatToBf16(f);
    }
    NEEDLE_CUDA_RETURN_IF_ERROR(cudaMemcpy(arena + u.offset, host.data(), n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    *u.slot = reinterpret_cast<const bf16*>(arena + u.offset);
  }
  if (c.tie_word_embeddings) dw->lm_head_ = dw->embed_;
  return dw;
}

}  // namespace needle::engine::cuda
