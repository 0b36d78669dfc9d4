// CpuExecutor: a chunk at a time, layer-major (all chunk tokens through layer i before layer i + 1),
// mirroring how the GPU executor processes prefill chunks. Per layer: projections; selection-cache
// writes; compressed tokens completed inside the chunk; attention per query (new rows of the chunk
// read from the chunk's own buffers where a ring could already have overwritten them); then the
// window-ring and staging writes; then the MLP.
#include "engine/cpu_executor.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/reference/ops_ref.h"

namespace needle::engine {

namespace ref = kernels::reference;

CpuExecutor::CpuExecutor(const ModelWeights& weights, const KvCacheConfig& cache)
    : w_(weights), c_(weights.config), layout_(CacheLayout::For(weights.config, cache)) {
  const NsaParams& n = c_.nsa;
  geo_ = ref::NsaGeometry{n.cmp_block, n.cmp_stride, n.sel_block,    n.num_selected,
                          n.forced_initial, n.forced_local, n.window, n.topk_merge_chunk};
  const int64_t per_head_rows[kNumPools] = {layout_.page_tokens, layout_.cmp_page_tokens, layout_.page_tokens,
                                            layout_.staging_rows};
  for (int p = 0; p < kNumPools; ++p) {
    if (!layout_.has_pool[p]) continue;
    PoolStore& s = pools_[p];
    s.rows_per_page = static_cast<int>(per_head_rows[p]);
    const int64_t rows = cache.num_pages[p] * c_.num_layers * c_.num_kv_heads * s.rows_per_page;
    s.k.assign(rows * c_.head_dim_qk, 0.0f);
    s.v.assign(rows * c_.head_dim_v, 0.0f);
  }
}

ref::KvRows CpuExecutor::Rows(const PoolStore& store, const std::vector<int32_t>& table, int layer, int head,
                              bool value, int ring_pages) const {
  const int d = value ? c_.head_dim_v : c_.head_dim_qk;
  ref::KvRows r;
  r.base = value ? store.v.data() : store.k.data();
  r.page_table = table.data();
  r.row_stride = d;
  r.page_rows = store.rows_per_page;
  r.page_stride = static_cast<int64_t>(c_.num_layers) * c_.num_kv_heads * store.rows_per_page * d;
  r.offset = (static_cast<int64_t>(layer) * c_.num_kv_heads + head) * store.rows_per_page * d;
  r.ring_pages = ring_pages;
  return r;
}

float* CpuExecutor::RowPtr(PoolStore& store, const std::vector<int32_t>& table, int layer, int head, bool value,
                           int64_t row, int ring_pages) {
  return const_cast<float*>(Rows(store, table, layer, head, value, ring_pages).Row(row));
}

absl::Status CpuExecutor::Run(const StepPlan& plan, StepOutput* out) {
  out->vocab = c_.vocab_size;
  out->first_row.clear();
  int64_t rows = 0;
  for (const SeqStep& s : plan.seqs) {
    out->first_row.push_back(rows);
    rows += s.all_logits ? static_cast<int64_t>(s.tokens.size()) : 1;
  }
  out->logits.assign(rows * c_.vocab_size, 0.0f);
  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    absl::Status st = RunSequence(plan.seqs[i], out->logits.data() + out->first_row[i] * c_.vocab_size);
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status CpuExecutor::RunSequence(const SeqStep& step, float* logits) {
  const int T = static_cast<int>(step.tokens.size());
  if (T == 0) return absl::InvalidArgumentError("empty step for a sequence");
  if (step.pages == nullptr || step.pages->capacity_tokens < step.start_pos + T) {
    return absl::InternalError(absl::StrCat("sequence ", step.seq, ": cache capacity below ", step.start_pos + T));
  }
  for (int32_t tok : step.tokens) {
    if (tok < 0 || tok >= c_.vocab_size) return absl::InvalidArgumentError(absl::StrCat("token id ", tok, " out of range"));
  }
  const SequencePages& pages = *step.pages;
  const int D = c_.hidden_size, H = c_.num_heads, Hkv = c_.num_kv_heads, G = c_.GroupSize();
  const int dk = c_.head_dim_qk, dv = c_.head_dim_v, I = c_.intermediate_size;
  const int64_t s0 = step.start_pos;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dk)));
  const bool nsa = c_.IsNsa();
  const bool shared = !nsa || c_.nsa.shared_kv;
  const bool mlp_cmp = nsa && c_.nsa.compression == Compression::kMlpPreRope;
  const bool win_pool = layout_.has_pool[static_cast<int>(Pool::kWindow)];
  const auto& sel_table = pages.table[static_cast<int>(Pool::kSelection)];
  const auto& cmp_table = pages.table[static_cast<int>(Pool::kCompressed)];
  const auto& win_table = pages.table[static_cast<int>(Pool::kWindow)];
  const auto& stg_table = pages.table[static_cast<int>(Pool::kStaging)];
  PoolStore& sel = pools_[static_cast<int>(Pool::kSelection)];
  PoolStore& cmp = pools_[static_cast<int>(Pool::kCompressed)];
  PoolStore& win = pools_[static_cast<int>(Pool::kWindow)];
  PoolStore& stg = pools_[static_cast<int>(Pool::kStaging)];

  std::vector<float> x(static_cast<size_t>(T) * D), xn(x.size());
  for (int t = 0; t < T; ++t) {
    const float* e = w_.embed.ptr() + static_cast<int64_t>(step.tokens[t]) * D;
    std::copy(e, e + D, x.data() + static_cast<size_t>(t) * D);
  }
  std::vector<float> q(static_cast<size_t>(T) * H * dk), gates(static_cast<size_t>(T) * H * 3);
  // Branch K/V of the chunk, [T][Hkv][d]: index kCmp/kSlc/kWin; shared archs use only kSlc.
  std::vector<float> kb[3], vb[3];
  std::vector<float> attn(static_cast<size_t>(T) * H * dv), proj(static_cast<size_t>(T) * D);
  std::vector<float> gate(I), up(I), act(I), kc(dk), vc(dv);

  for (int layer = 0; layer < c_.num_layers; ++layer) {
    const LayerWeights& L = w_.layers[layer];
    for (int t = 0; t < T; ++t) {
      const int64_t pos = s0 + t;
      float* xt = xn.data() + static_cast<size_t>(t) * D;
      ref::RmsNorm(x.data() + static_cast<size_t>(t) * D, L.attn_norm.ptr(), D, c_.norm_eps, xt);
      float* qt = q.data() + static_cast<size_t>(t) * H * dk;
      ref::Linear(L.q_proj.ptr(), c_.qkv_bias ? L.q_bias.ptr() : nullptr, xt, D, H * dk, qt);
      for (int h = 0; h < H; ++h) ref::ApplyRope(qt + h * dk, dk, pos, c_.rope_theta);
      if (nsa) {
        float* gt = gates.data() + static_cast<size_t>(t) * H * 3;
        ref::Linear(L.g_proj.ptr(), nullptr, xt, D, H * 3, gt);
        for (int i = 0; i < H * 3; ++i) gt[i] = ref::Sigmoid(gt[i]);
      }
    }
    // Branch projections.
    for (int b = 0; b < 3; ++b) {
      const bool used = shared ? b == kSlc : true;
      if (!used) continue;
      kb[b].resize(static_cast<size_t>(T) * Hkv * dk);
      vb[b].resize(static_cast<size_t>(T) * Hkv * dv);
      const Tensor& Wk = shared ? L.k_proj : L.branch_k_proj[b];
      const Tensor& Wv = shared ? L.v_proj : L.branch_v_proj[b];
      for (int t = 0; t < T; ++t) {
        const float* xt = xn.data() + static_cast<size_t>(t) * D;
        float* kt = kb[b].data() + static_cast<size_t>(t) * Hkv * dk;
        ref::Linear(Wk.ptr(), shared && c_.qkv_bias ? L.k_bias.ptr() : nullptr, xt, D, Hkv * dk, kt);
        ref::Linear(Wv.ptr(), shared && c_.qkv_bias ? L.v_bias.ptr() : nullptr, xt, D, Hkv * dv,
                    vb[b].data() + static_cast<size_t>(t) * Hkv * dv);
        // The cmp branch of the MLP compression stays pre-RoPE (RoPE goes on the compressed key).
        if (!(mlp_cmp && b == kCmp)) {
          for (int h = 0; h < Hkv; ++h) ref::ApplyRope(kt + h * dk, dk, s0 + t, c_.rope_theta);
        }
      }
    }
    // Selection cache (the whole K/V cache of a dense model).
    for (int t = 0; t < T; ++t) {
      for (int h = 0; h < Hkv; ++h) {
        const float* kt = kb[kSlc].data() + (static_cast<size_t>(t) * Hkv + h) * dk;
        const float* vt = vb[kSlc].data() + (static_cast<size_t>(t) * Hkv + h) * dv;
        std::copy(kt, kt + dk, RowPtr(sel, sel_table, layer, h, false, s0 + t, 0));
        std::copy(vt, vt + dv, RowPtr(sel, sel_table, layer, h, true, s0 + t, 0));
      }
    }
    // Compressed tokens completed by this chunk.
    if (nsa) {
      const NsaParams& n = c_.nsa;
      for (int t = 0; t < T; ++t) {
        const int64_t pos = s0 + t;
        if (!n.CompletesCompressed(pos)) continue;
        const int64_t i = n.NumCompressed(pos) - 1;
        const int64_t start = i * n.cmp_stride;
        for (int h = 0; h < Hkv; ++h) {
          if (mlp_cmp) {
            ref::KvRows rk = Rows(stg, stg_table, layer, h, false, 1), rv = Rows(stg, stg_table, layer, h, true, 1);
            rk.tail = kb[kCmp].data() + h * dk, rk.tail_start = s0, rk.tail_stride = static_cast<int64_t>(Hkv) * dk;
            rv.tail = vb[kCmp].data() + h * dv, rv.tail_start = s0, rv.tail_stride = static_cast<int64_t>(Hkv) * dv;
            ref::MlpCompress(rk, start, n.cmp_block, dk, L.cmp_k_pos.ptr(), L.cmp_k_fc1.ptr(), L.cmp_k_fc2.ptr(),
                             n.cmp_mlp_hidden, kc.data());
            ref::ApplyRope(kc.data(), dk, start, c_.rope_theta);
            ref::MlpCompress(rv, start, n.cmp_block, dv, L.cmp_v_pos.ptr(), L.cmp_v_fc1.ptr(), L.cmp_v_fc2.ptr(),
                             n.cmp_mlp_hidden, vc.data());
          } else {
            ref::MeanRows(Rows(sel, sel_table, layer, h, false, 0), start, n.cmp_block, dk, kc.data());
            ref::MeanRows(Rows(sel, sel_table, layer, h, true, 0), start, n.cmp_block, dv, vc.data());
          }
          std::copy(kc.begin(), kc.end(), RowPtr(cmp, cmp_table, layer, h, false, i, 0));
          std::copy(vc.begin(), vc.end(), RowPtr(cmp, cmp_table, layer, h, true, i, 0));
        }
      }
    }
    // Attention, one query position and KV group at a time.
    for (int t = 0; t < T; ++t) {
      const int64_t pos = s0 + t;
      for (int h = 0; h < Hkv; ++h) {
        const float* qg = q.data() + (static_cast<size_t>(t) * H + static_cast<size_t>(h) * G) * dk;
        float* og = attn.data() + (static_cast<size_t>(t) * H + static_cast<size_t>(h) * G) * dv;
        ref::KvRows ks = Rows(sel, sel_table, layer, h, false, 0), vs = Rows(sel, sel_table, layer, h, true, 0);
        if (!nsa) {
          ref::DenseAttention(qg, G, dk, dv, ks, vs, pos, scale, og);
          continue;
        }
        ref::NsaBranchRows r;
        r.kc = Rows(cmp, cmp_table, layer, h, false, 0);
        r.vc = Rows(cmp, cmp_table, layer, h, true, 0);
        r.ks = ks;
        r.vs = vs;
        if (win_pool) {
          r.kw = Rows(win, win_table, layer, h, false, layout_.window_ring_pages);
          r.vw = Rows(win, win_table, layer, h, true, layout_.window_ring_pages);
          r.kw.tail = kb[kWin].data() + h * dk, r.kw.tail_start = s0, r.kw.tail_stride = static_cast<int64_t>(Hkv) * dk;
          r.vw.tail = vb[kWin].data() + h * dv, r.vw.tail_start = s0, r.vw.tail_stride = static_cast<int64_t>(Hkv) * dv;
        } else {
          r.kw = ks;
          r.vw = vs;
        }
        ref::NsaAttention(qg, gates.data() + (static_cast<size_t>(t) * H + static_cast<size_t>(h) * G) * 3, G, dk,
                          dv, r, pos, scale, geo_, og);
      }
    }
    // Ring writes come after attention: a long chunk may wrap the ring over rows its own queries read.
    for (int t = 0; t < T; ++t) {
      for (int h = 0; h < Hkv; ++h) {
        if (win_pool) {
          const float* kt = kb[kWin].data() + (static_cast<size_t>(t) * Hkv + h) * dk;
          const float* vt = vb[kWin].data() + (static_cast<size_t>(t) * Hkv + h) * dv;
          std::copy(kt, kt + dk, RowPtr(win, win_table, layer, h, false, s0 + t, layout_.window_ring_pages));
          std::copy(vt, vt + dv, RowPtr(win, win_table, layer, h, true, s0 + t, layout_.window_ring_pages));
        }
        if (mlp_cmp) {
          const float* kt = kb[kCmp].data() + (static_cast<size_t>(t) * Hkv + h) * dk;
          const float* vt = vb[kCmp].data() + (static_cast<size_t>(t) * Hkv + h) * dv;
          std::copy(kt, kt + dk, RowPtr(stg, stg_table, layer, h, false, s0 + t, 1));
          std::copy(vt, vt + dv, RowPtr(stg, stg_table, layer, h, true, s0 + t, 1));
        }
      }
    }
    // Output projection, residual, MLP.
    for (int t = 0; t < T; ++t) {
      float* xt = x.data() + static_cast<size_t>(t) * D;
      float* pt = proj.data() + static_cast<size_t>(t) * D;
      ref::Linear(L.o_proj.ptr(), nullptr, attn.data() + static_cast<size_t>(t) * H * dv, H * dv, D, pt);
      for (int i = 0; i < D; ++i) xt[i] += pt[i];
      float* xnt = xn.data() + static_cast<size_t>(t) * D;
      ref::RmsNorm(xt, L.mlp_norm.ptr(), D, c_.norm_eps, xnt);
      ref::Linear(L.gate_proj.ptr(), nullptr, xnt, D, I, gate.data());
      ref::Linear(L.up_proj.ptr(), nullptr, xnt, D, I, up.data());
      ref::SwiGlu(gate.data(), up.data(), I, act.data());
      ref::Linear(L.down_proj.ptr(), nullptr, act.data(), I, D, pt);
      for (int i = 0; i < D; ++i) xt[i] += pt[i];
    }
  }
  // Final norm and logits.
  const Tensor& head = w_.LmHead();
  const int first = step.all_logits ? 0 : T - 1;
  for (int t = first; t < T; ++t) {
    float* xnt = xn.data() + static_cast<size_t>(t) * D;
    ref::RmsNorm(x.data() + static_cast<size_t>(t) * D, w_.final_norm.ptr(), D, c_.norm_eps, xnt);
    ref::Linear(head.ptr(), nullptr, xnt, D, c_.vocab_size, logits + static_cast<size_t>(t - first) * c_.vocab_size);
  }
  return absl::OkStatus();
}

}  // namespace needle::engine
