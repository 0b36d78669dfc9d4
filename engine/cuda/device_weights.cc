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

// Parts of the fused projection start at multiples of this many columns (16 bytes of bf16).
constexpr int64_t kFusedAlign = 8;

int64_t AlignUp(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

// One run of elements of a device tensor: a host tensor, which must hold `numel` elements, or `numel`
// zeros (padding) when `tensor` is null. `slot`, if set, receives the run's device address.
struct Part {
  std::string name;
  const Tensor* tensor = nullptr;
  int64_t numel = 0;
  const bf16** slot = nullptr;
};

// One device tensor: its parts stored back to back (gate_up has two, the fused projection up to
// seven plus padding), and where its device pointer goes once the arena exists.
struct PendingTensor {
  std::vector<Part> parts;
  const bf16** slot = nullptr;
  int64_t numel = 0;  // sum of the parts'
  size_t offset = 0;  // bytes into the arena
};

}  // namespace

FusedProjection FusedProjection::For(const ModelConfig& m) {
  const int64_t H = m.num_heads, kw = int64_t{m.num_kv_heads} * m.head_dim_qk,
                vw = int64_t{m.num_kv_heads} * m.head_dim_v;
  const bool nsa = m.IsNsa(), independent = nsa && !m.nsa.shared_kv;
  const bool win = independent && m.nsa.window > 0;
  const bool cmp = independent && m.nsa.compression == Compression::kMlpPreRope;
  FusedProjection f;
  auto place = [&](int64_t* col, int64_t n) {
    *col = f.width;
    f.width += AlignUp(n, kFusedAlign);
    f.padding += AlignUp(n, kFusedAlign) - n;
  };
  if (nsa) place(&f.gate, 3 * H);
  place(&f.k[kSlc], kw);
  if (win) place(&f.k[kWin], kw);
  place(&f.v[kSlc], vw);
  if (win) place(&f.v[kWin], vw);
  if (cmp) {
    place(&f.k[kCmp], kw);
    place(&f.v[kCmp], vw);
  }
  return f;
}

absl::Status CheckModelSupported(const ModelConfig& m) {
  auto no = [&](const std::string& why) {
    return absl::UnimplementedError(absl::StrCat("the CUDA executor cannot run this ", ArchitectureName(m.arch),
                                                 " model: ", why));
  };
  if (m.num_kv_heads <= 0 || m.num_heads % m.num_kv_heads != 0) return no("num_heads must be a multiple of num_kv_heads");
  const int G = m.GroupSize();
  if (m.head_dim_qk % 2 != 0) return no(absl::StrCat("RoPE needs an even head_dim, got ", m.head_dim_qk));
  if (m.IsNsa() && m.nsa.shared_kv && m.nsa.compression == Compression::kMlpPreRope) {
    // The MLP compresses pre-RoPE cmp-branch K/V, which shared K/V (post-RoPE in place) does not keep.
    return no("the MLP compression needs independent branch K/V (its own pre-RoPE cmp projections)");
  }
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
  int64_t elems = 0, tensors = 0;
  for (const TensorSpec& spec : TensorSpecs(model)) {
    int64_t n = 1;
    for (int64_t d : spec.shape) n *= d;
    elems += n;
    ++tensors;
  }
  // The fused projection's padding rows, in weights and bias.
  elems += FusedProjection::For(model).padding * (model.hidden_size + 1) * model.num_layers;
  // Each tensor, and the fused bias of each layer, rounded up to kTensorAlign bytes at most.
  const int64_t aligned = tensors + model.num_layers;
  return elems * static_cast<int64_t>(sizeof(bf16)) + aligned * static_cast<int64_t>(kTensorAlign);
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
  const FusedProjection& f = dw->fused_ = FusedProjection::For(c);

  std::vector<PendingTensor> uploads;
  auto add = [&](std::string name, const Tensor* t, int64_t numel, const bf16** slot) {
    uploads.push_back(PendingTensor{{Part{std::move(name), t, numel, nullptr}}, slot});
  };
  // A tensor of `f.width` columns of `per_col` elements each (hidden for the fused weight rows, 1 for
  // the fused bias) from parts at their columns, zeros elsewhere.
  struct Placed {
    int64_t col;
    Part part;  // numel: its columns times per_col
  };
  auto add_fused = [&](std::vector<Placed> placed, int64_t per_col, const bf16** slot) {
    std::sort(placed.begin(), placed.end(), [](const Placed& a, const Placed& b) { return a.col < b.col; });
    PendingTensor t{{}, slot};
    for (Placed& pl : placed) {
      const int64_t at = pl.col * per_col;
      if (at > t.numel) t.parts.push_back(Part{"padding", nullptr, at - t.numel, nullptr});
      t.numel = at + pl.part.numel;
      t.parts.push_back(std::move(pl.part));
    }
    const int64_t end = f.width * per_col;
    if (end > t.numel) t.parts.push_back(Part{"padding", nullptr, end - t.numel, nullptr});
    uploads.push_back(std::move(t));
  };

  add("embed", &w.embed, c.vocab_size * D, &dw->embed_);
  add("final_norm", &w.final_norm, D, &dw->final_norm_);
  if (!c.tie_word_embeddings) add("lm_head", &w.lm_head, c.vocab_size * D, &dw->lm_head_);
  if (static_cast<int>(w.layers.size()) != c.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights have ", w.layers.size(), " layers, the config says ", c.num_layers));
  }
  for (int i = 0; i < c.num_layers; ++i) {
    const LayerWeights& L = w.layers[i];
    DeviceLayer& d = dw->layers_[i];
    const std::string p = absl::StrCat("layer ", i, " ");
    add(p + "attn_norm", &L.attn_norm, D, &d.attn_norm);
    add(p + "q_proj", &L.q_proj, H * dk * D, &d.q_proj);
    if (c.qkv_bias) add(p + "q_bias", &L.q_bias, H * dk, &d.q_bias);

    // The fused input projection: g_proj and the branch K/V projections the executor reads; a branch
    // projection it never reads (independent K/V without a window ring or without the MLP
    // compression) is uploaded on its own, as before the fusion.
    std::vector<Placed> proj;
    if (nsa) proj.push_back({f.gate, Part{p + "g_proj", &L.g_proj, 3 * H * D, &d.g_proj}});
    for (int b = 0; b < 3; ++b) {
      if (shared && b != kSlc) continue;
      const Tensor* k = shared ? &L.k_proj : &L.branch_k_proj[b];
      const Tensor* v = shared ? &L.v_proj : &L.branch_v_proj[b];
      const std::string name = shared ? p : absl::StrCat(p, "branch ", b, " ");
      if (f.k[b] >= 0) {
        proj.push_back({f.k[b], Part{name + "k_proj", k, Hkv * dk * D, &d.k_proj[b]}});
        proj.push_back({f.v[b], Part{name + "v_proj", v, Hkv * dv * D, &d.v_proj[b]}});
      } else {
        add(name + "k_proj", k, Hkv * dk * D, &d.k_proj[b]);
        add(name + "v_proj", v, Hkv * dv * D, &d.v_proj[b]);
      }
    }
    add_fused(std::move(proj), D, &d.fused_proj);
    if (c.qkv_bias && shared) {  // independent branch projections carry no biases
      add_fused({{f.k[kSlc], Part{p + "k_bias", &L.k_bias, Hkv * dk, &d.k_bias}},
                 {f.v[kSlc], Part{p + "v_bias", &L.v_bias, Hkv * dv, &d.v_bias}}},
                1, &d.fused_bias);
    }

    add(p + "o_proj", &L.o_proj, D * H * dv, &d.o_proj);
    if (mlp_cmp) {
      const int64_t l = c.nsa.cmp_block, hc = c.nsa.cmp_mlp_hidden;
      add(p + "cmp_k_pos", &L.cmp_k_pos, l * dk, &d.cmp_k_pos);
      add(p + "cmp_k_fc1", &L.cmp_k_fc1, hc * l * dk, &d.cmp_k_fc1);
      add(p + "cmp_k_fc2", &L.cmp_k_fc2, dk * hc, &d.cmp_k_fc2);
      add(p + "cmp_v_pos", &L.cmp_v_pos, l * dv, &d.cmp_v_pos);
      add(p + "cmp_v_fc1", &L.cmp_v_fc1, hc * l * dv, &d.cmp_v_fc1);
      add(p + "cmp_v_fc2", &L.cmp_v_fc2, dv * hc, &d.cmp_v_fc2);
    }
    add(p + "mlp_norm", &L.mlp_norm, D, &d.mlp_norm);
    uploads.push_back(PendingTensor{{Part{p + "gate_proj", &L.gate_proj, I * D, nullptr},
                                     Part{p + "up_proj", &L.up_proj, I * D, nullptr}},
                                    &d.gate_up});
    add(p + "down_proj", &L.down_proj, D * I, &d.down_proj);
  }

  size_t total = 0, largest = 0;
  for (PendingTensor& u : uploads) {
    u.numel = 0;
    for (const Part& part : u.parts) {
      if (part.tensor != nullptr && static_cast<int64_t>(part.tensor->data.size()) != part.numel) {
        return absl::InvalidArgumentError(absl::StrCat("weight ", part.name, " has ", part.tensor->data.size(),
                                                       " elements, the config needs ", part.numel));
      }
      u.numel += part.numel;
    }
    u.offset = total;
    total += (static_cast<size_t>(u.numel) * sizeof(bf16) + kTensorAlign - 1) / kTensorAlign * kTensorAlign;
    largest = std::max(largest, static_cast<size_t>(u.numel));
  }
  if (absl::Status s = dw->arena_.Allocate(total, "the model weights"); !s.ok()) return s;

  std::vector<uint16_t> host(largest);
  char* arena = dw->arena_.as<char>();
  for (const PendingTensor& u : uploads) {
    const bf16* base = reinterpret_cast<const bf16*>(arena + u.offset);
    size_t n = 0;
    for (const Part& part : u.parts) {
      if (part.slot != nullptr) *part.slot = base + n;
      if (part.tensor == nullptr) {
        std::fill_n(host.begin() + n, part.numel, uint16_t{0});  // bf16 +0
        n += static_cast<size_t>(part.numel);
      } else {
        for (float x : part.tensor->data) host[n++] = FloatToBf16(x);
      }
    }
    NEEDLE_CUDA_RETURN_IF_ERROR(cudaMemcpy(arena + u.offset, host.data(), n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    *u.slot = base;
  }
  if (c.tie_word_embeddings) dw->lm_head_ = dw->embed_;
  return dw;
}

}  // namespace needle::engine::cuda
