// The naive reference forward pass: see naive_forward.h. Every quantity is recomputed from its
// definition in docs/nsa-inference.md; nothing here may be shared with, or copied from, the engine's
// executors or kernels/reference.
#include "tests/support/naive_forward.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <stdexcept>
#include <string>

namespace needle::testing {
namespace {

using engine::Architecture;
using engine::Branch;
using engine::Compression;
using engine::LayerWeights;
using engine::ModelConfig;
using engine::ModelWeights;
using engine::NsaParams;
using engine::Tensor;

void Require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("NaiveForward: " + what);
}

double Silu(double x) { return x / (1.0 + std::exp(-x)); }
double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// y = W x (+ b), W [out][in] as stored by PyTorch; b may be empty.
std::vector<double> Linear(const Tensor& w, const std::vector<double>& x, const Tensor* bias,
                           const char* name) {
  Require(w.shape.size() == 2 && w.shape[1] == static_cast<int64_t>(x.size()) &&
              static_cast<int64_t>(w.data.size()) == w.shape[0] * w.shape[1],
          std::string(name) + " has the wrong shape");
  const int64_t out = w.shape[0], in = w.shape[1];
  std::vector<double> y(out, 0.0);
  for (int64_t o = 0; o < out; ++o) {
    double s = 0.0;
    for (int64_t i = 0; i < in; ++i) s += static_cast<double>(w.data[o * in + i]) * x[i];
    y[o] = s;
  }
  if (bias != nullptr) {
    Require(static_cast<int64_t>(bias->data.size()) == out, std::string(name) + " bias has the wrong size");
    for (int64_t o = 0; o < out; ++o) y[o] += bias->data[o];
  }
  return y;
}

// x / sqrt(mean(x^2) + eps) * w
std::vector<double> RmsNorm(const std::vector<double>& x, const Tensor& w, double eps, const char* name) {
  Require(w.data.size() == x.size(), std::string(name) + " has the wrong size");
  double ss = 0.0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * static_cast<double>(w.data[i]);
  return y;
}

// Projects every normed input row to [T][heads][dim], optionally with RoPE at the row's position.
SeqTensor Project(const std::vector<std::vector<double>>& xn, const Tensor& w, const Tensor* bias,
                  int heads, int dim, bool rope, double theta, const char* name) {
  const int64_t T = static_cast<int64_t>(xn.size());
  SeqTensor out(T, heads, dim);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> y = Linear(w, xn[t], bias, name);
    Require(static_cast<int64_t>(y.size()) == static_cast<int64_t>(heads) * dim,
            std::string(name) + " output is not heads * head_dim");
    for (int h = 0; h < heads; ++h) {
      double* row = out.at(t, h);
      for (int c = 0; c < dim; ++c) row[c] = y[h * dim + c];
      if (rope) ApplyRope(row, dim, t, theta);
    }
  }
  return out;
}

std::vector<int64_t> Range(int64_t first, int64_t last_inclusive) {
  std::vector<int64_t> r;
  for (int64_t i = first; i <= last_inclusive; ++i) r.push_back(i);
  return r;
}

// Dense causal attention (llama): [T][H*d_v].
std::vector<std::vector<double>> DenseAttention(const ModelConfig& c, const LayerWeights& L,
                                                const std::vector<std::vector<double>>& xn) {
  const int64_t T = static_cast<int64_t>(xn.size());
  const int H = c.num_heads, Hkv = c.num_kv_heads, G = c.GroupSize(), dk = c.head_dim_qk,
            dv = c.head_dim_v;
  const double scale = 1.0 / std::sqrt(static_cast<double>(dk));
  const auto bias = [&](const Tensor& b) { return c.qkv_bias ? &b : nullptr; };
  SeqTensor q = Project(xn, L.q_proj, bias(L.q_bias), H, dk, true, c.rope_theta, "q_proj");
  SeqTensor k = Project(xn, L.k_proj, bias(L.k_bias), Hkv, dk, true, c.rope_theta, "k_proj");
  SeqTensor v = Project(xn, L.v_proj, bias(L.v_bias), Hkv, dv, false, c.rope_theta, "v_proj");
  std::vector<std::vector<double>> out(T, std::vector<double>(static_cast<size_t>(H) * dv, 0.0));
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<int64_t> rows = Range(0, t);
    for (int h = 0; h < H; ++h) {
      std::vector<double> o = Attend(q.at(t, h), k, v, h / G, rows, scale);
      for (int e = 0; e < dv; ++e) out[t][h * dv + e] = o[e];
    }
  }
  return out;
}

// The three gated NSA branches: [T][H*d_v].
std::vector<std::vector<double>> NsaAttention(const ModelConfig& c, const LayerWeights& L,
                                              const std::vector<std::vector<double>>& xn) {
  const NsaParams& nsa = c.nsa;
  const int64_t T = static_cast<int64_t>(xn.size());
  const int H = c.num_heads, Hkv = c.num_kv_heads, G = c.GroupSize(), dk = c.head_dim_qk,
            dv = c.head_dim_v;
  const double theta = c.rope_theta;
  const double scale = 1.0 / std::sqrt(static_cast<double>(dk));
  const int64_t l = nsa.cmp_block, d = nsa.cmp_stride, lp = nsa.sel_block;

  SeqTensor q = Project(xn, L.q_proj, c.qkv_bias ? &L.q_bias : nullptr, H, dk, true, theta, "q_proj");

  // Each branch's K/V projection: the shared one (biased when qkv_bias), or the branch's own
  // (nsa-paper's branch projections have no biases).
  auto k_weight = [&](int b) -> const Tensor& { return nsa.shared_kv ? L.k_proj : L.branch_k_proj[b]; };
  auto v_weight = [&](int b) -> const Tensor& { return nsa.shared_kv ? L.v_proj : L.branch_v_proj[b]; };
  auto k_bias = [&]() -> const Tensor* { return nsa.shared_kv && c.qkv_bias ? &L.k_bias : nullptr; };
  auto v_bias = [&]() -> const Tensor* { return nsa.shared_kv && c.qkv_bias ? &L.v_bias : nullptr; };

  // Post-RoPE keys and values of the selection and window branches.
  SeqTensor k_slc = Project(xn, k_weight(engine::kSlc), k_bias(), Hkv, dk, true, theta, "slc k_proj");
  SeqTensor v_slc = Project(xn, v_weight(engine::kSlc), v_bias(), Hkv, dv, false, theta, "slc v_proj");
  SeqTensor k_win, v_win;
  if (nsa.window > 0) {
    k_win = Project(xn, k_weight(engine::kWin), k_bias(), Hkv, dk, true, theta, "win k_proj");
    v_win = Project(xn, v_weight(engine::kWin), v_bias(), Hkv, dv, false, theta, "win v_proj");
  }

  // Compressed tokens i = 0..N_c(T-1)-1, each from raw cmp-branch rows [i*d, i*d + l). Computing all
  // of them up front is just the definition; visibility is applied per query below.
  const int64_t num_cmp = T > 0 ? NumVisibleCompressed(nsa, T - 1) : 0;
  SeqTensor k_cmp(num_cmp, Hkv, dk), v_cmp(num_cmp, Hkv, dv);
  if (nsa.compression == Compression::kMeanPostRope) {
    SeqTensor k_raw = Project(xn, k_weight(engine::kCmp), k_bias(), Hkv, dk, true, theta, "cmp k_proj");
    SeqTensor v_raw = Project(xn, v_weight(engine::kCmp), v_bias(), Hkv, dv, false, theta, "cmp v_proj");
    for (int64_t i = 0; i < num_cmp; ++i) {
      for (int h = 0; h < Hkv; ++h) {
        for (int64_t r = i * d; r < i * d + l; ++r) {
          for (int e = 0; e < dk; ++e) k_cmp.at(i, h)[e] += k_raw.at(r, h)[e] / static_cast<double>(l);
          for (int e = 0; e < dv; ++e) v_cmp.at(i, h)[e] += v_raw.at(r, h)[e] / static_cast<double>(l);
        }
      }
    }
  } else {
    SeqTensor k_raw = Project(xn, k_weight(engine::kCmp), k_bias(), Hkv, dk, false, theta, "cmp k_proj");
    SeqTensor v_raw = Project(xn, v_weight(engine::kCmp), v_bias(), Hkv, dv, false, theta, "cmp v_proj");
    for (int64_t i = 0; i < num_cmp; ++i) {
      for (int h = 0; h < Hkv; ++h) {
        std::vector<double> kc = CompressMlp(L.cmp_k_pos, L.cmp_k_fc1, L.cmp_k_fc2, k_raw, h, i * d);
        std::vector<double> vc = CompressMlp(L.cmp_v_pos, L.cmp_v_fc1, L.cmp_v_fc2, v_raw, h, i * d);
        Require(static_cast<int>(kc.size()) == dk && static_cast<int>(vc.size()) == dv,
                "compression MLP output is not the head dim");
        ApplyRope(kc.data(), dk, i * d, theta);  // the compressed key sits at position i*d
        std::copy(kc.begin(), kc.end(), k_cmp.at(i, h));
        std::copy(vc.begin(), vc.end(), v_cmp.at(i, h));
      }
    }
  }

  std::vector<std::vector<double>> out(T, std::vector<double>(static_cast<size_t>(H) * dv, 0.0));
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<double> gate = Linear(L.g_proj, xn[t], nullptr, "g_proj");
    Require(static_cast<int>(gate.size()) == 3 * H, "g_proj output is not 3 * num_heads");
    const std::vector<int64_t> cmp_rows = Range(0, NumVisibleCompressed(nsa, t) - 1);
    const std::vector<int64_t> win_rows = Range(WindowStart(nsa.window, t), t);
    for (int kh = 0; kh < Hkv; ++kh) {
      std::vector<std::vector<double>> o_cmp(G), probs(G);
      for (int g = 0; g < G; ++g) {
        o_cmp[g] = Attend(q.at(t, kh * G + g), k_cmp, v_cmp, kh, cmp_rows, scale, &probs[g]);
      }
      std::vector<int64_t> slc_rows;
      for (int64_t j : SelectBlocks(nsa, t, probs)) {
        for (int64_t r = j * lp; r < (j + 1) * lp && r <= t; ++r) slc_rows.push_back(r);
      }
      for (int g = 0; g < G; ++g) {
        const int h = kh * G + g;
        const std::vector<double> o_slc = Attend(q.at(t, h), k_slc, v_slc, kh, slc_rows, scale);
        std::vector<double> o_win(dv, 0.0);
        if (nsa.window > 0) o_win = Attend(q.at(t, h), k_win, v_win, kh, win_rows, scale);
        const double g_cmp = Sigmoid(gate[3 * h + engine::kCmp]);
        const double g_slc = Sigmoid(gate[3 * h + engine::kSlc]);
        const double g_win = nsa.window > 0 ? Sigmoid(gate[3 * h + engine::kWin]) : 0.0;
        for (int e = 0; e < dv; ++e) {
          out[t][h * dv + e] = g_cmp * o_cmp[g][e] + g_slc * o_slc[e] + g_win * o_win[e];
        }
      }
    }
  }
  return out;
}

}  // namespace

int64_t NumVisibleCompressed(const NsaParams& nsa, int64_t t) {
  int64_t n = 0;
  while (n * nsa.cmp_stride + nsa.cmp_block - 1 <= t) ++n;
  return n;
}

int64_t IntervalOverlap(int64_t a0, int64_t a1, int64_t b0, int64_t b1) {
  return std::max<int64_t>(0, std::min(a1, b1) - std::max(a0, b0));
}

std::vector<double> BlockScores(const NsaParams& nsa, int64_t t, const std::vector<double>& probs) {
  const int64_t l = nsa.cmp_block, d = nsa.cmp_stride, lp = nsa.sel_block;
  const int64_t num_blocks = t / lp + 1;
  Require(static_cast<int64_t>(probs.size()) == NumVisibleCompressed(nsa, t),
          "BlockScores: probs must have N_c(t) entries");
  std::vector<double> score(num_blocks, 0.0);
  if (l == d && d == lp) {
    for (size_t j = 0; j < probs.size(); ++j) score[j] = probs[j];
    return score;
  }
  for (int64_t i = 0; i < static_cast<int64_t>(probs.size()); ++i) {
    // Only blocks that can intersect [i*d, i*d + l) contribute; the overlap decides the weight.
    for (int64_t j = (i * d) / lp; j <= (i * d + l - 1) / lp && j < num_blocks; ++j) {
      const int64_t overlap = IntervalOverlap(i * d, i * d + l, j * lp, (j + 1) * lp);
      score[j] += probs[i] * static_cast<double>(overlap) / static_cast<double>(d);
    }
  }
  return score;
}

std::vector<int64_t> SelectBlocks(const NsaParams& nsa, int64_t t,
                                  const std::vector<std::vector<double>>& head_probs) {
  const int64_t current = t / nsa.sel_block;
  const int64_t num_blocks = current + 1;
  std::vector<double> group(num_blocks, 0.0);
  for (const std::vector<double>& p : head_probs) {
    const std::vector<double> s = BlockScores(nsa, t, p);
    for (int64_t j = 0; j < num_blocks; ++j) group[j] += s[j];
  }
  std::set<int64_t> chosen;
  if (num_blocks <= nsa.num_selected) {
    for (int64_t j = 0; j < num_blocks; ++j) chosen.insert(j);
    return {chosen.begin(), chosen.end()};
  }
  auto forced = [&](int64_t j) { return j < nsa.forced_initial || j > current - nsa.forced_local; };
  // llama-nsa (fla-org's Triton top-k, chunks of C blocks): when n > C/2 and a whole chunk precedes
  // the current one, a block can only be chosen if it is among the C/2 leaders of its side of the
  // current chunk's start. Leaders: forced blocks (lower index first), then higher score, then
  // lower index.
  std::vector<bool> allowed(num_blocks, true);
  const int64_t C = nsa.topk_merge_chunk;
  if (C > 0 && nsa.num_selected > C / 2 && current >= C) {
    const int64_t boundary = current - current % C;
    auto leads = [&](int64_t a, int64_t b) {
      if (forced(a) || forced(b)) return forced(a) && (!forced(b) || a < b);
      return group[a] > group[b] || (group[a] == group[b] && a < b);
    };
    for (const auto& [lo, hi] : {std::pair<int64_t, int64_t>{0, boundary}, {boundary, num_blocks}}) {
      std::vector<int64_t> side;
      for (int64_t j = lo; j < hi; ++j) side.push_back(j);
      std::sort(side.begin(), side.end(), leads);
      for (size_t r = static_cast<size_t>(C / 2); r < side.size(); ++r) allowed[side[r]] = false;
    }
  }
  for (int64_t j = 0; j < num_blocks; ++j) {
    if (forced(j) && allowed[j]) chosen.insert(j);
  }
  std::vector<int64_t> rest;
  for (int64_t j = 0; j < num_blocks; ++j) {
    if (chosen.count(j) == 0 && allowed[j]) rest.push_back(j);
  }
  // Highest score first; equal scores: lower block index first.
  std::stable_sort(rest.begin(), rest.end(), [&](int64_t a, int64_t b) { return group[a] > group[b]; });
  for (int64_t j : rest) {
    if (static_cast<int64_t>(chosen.size()) >= nsa.num_selected) break;
    chosen.insert(j);
  }
  return {chosen.begin(), chosen.end()};
}

int64_t WindowStart(int window, int64_t t) { return std::max<int64_t>(0, t - window + 1); }

void ApplyRope(double* x, int dim, int64_t pos, double theta) {
  const int half = dim / 2;
  for (int i = 0; i < half; ++i) {
    const float inv_freq = static_cast<float>(std::pow(theta, -2.0 * i / static_cast<double>(dim)));
    const float angle = static_cast<float>(pos) * inv_freq;
    const double c = std::cos(static_cast<double>(angle)), s = std::sin(static_cast<double>(angle));
    const double a = x[i], b = x[i + half];
    x[i] = a * c - b * s;
    x[i + half] = b * c + a * s;
  }
}

std::vector<double> Attend(const double* q, const SeqTensor& k, const SeqTensor& v, int kv_head,
                           const std::vector<int64_t>& rows, double scale, std::vector<double>* probs) {
  std::vector<double> out(v.dim, 0.0);
  if (probs != nullptr) probs->clear();
  if (rows.empty()) return out;
  std::vector<double> s(rows.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    const double* kr = k.at(rows[r], kv_head);
    double dot = 0.0;
    for (int e = 0; e < k.dim; ++e) dot += q[e] * kr[e];
    s[r] = dot * scale;
  }
  const double mx = *std::max_element(s.begin(), s.end());
  double sum = 0.0;
  for (double& x : s) {
    x = std::exp(x - mx);
    sum += x;
  }
  for (double& x : s) x /= sum;
  for (size_t r = 0; r < rows.size(); ++r) {
    const double* vr = v.at(rows[r], kv_head);
    for (int e = 0; e < v.dim; ++e) out[e] += s[r] * vr[e];
  }
  if (probs != nullptr) *probs = std::move(s);
  return out;
}

std::vector<double> CompressMlp(const Tensor& pos, const Tensor& fc1, const Tensor& fc2, const SeqTensor& x,
                                int kv_head, int64_t first_row) {
  const int64_t dim = x.dim;
  Require(pos.shape.size() == 2 && pos.shape[1] == dim && pos.numel() == static_cast<int64_t>(pos.data.size()),
          "compression pos_emb has the wrong shape");
  const int64_t l = pos.shape[0];
  Require(first_row + l <= x.len, "compression block runs past the sequence");
  std::vector<double> flat(static_cast<size_t>(l * dim));
  for (int64_t r = 0; r < l; ++r) {
    for (int64_t c = 0; c < dim; ++c) {
      flat[r * dim + c] = x.at(first_row + r, kv_head)[c] + static_cast<double>(pos.data[r * dim + c]);
    }
  }
  std::vector<double> hidden = Linear(fc1, flat, nullptr, "compression fc1");
  for (double& h : hidden) h = Silu(h);
  return Linear(fc2, hidden, nullptr, "compression fc2");
}

std::vector<std::vector<float>> NaiveForward(const ModelWeights& w, const std::vector<int32_t>& tokens) {
  const ModelConfig& c = w.config;
  const int64_t T = static_cast<int64_t>(tokens.size());
  const int64_t D = c.hidden_size;
  const double eps = static_cast<double>(c.norm_eps);
  Require(static_cast<int>(w.layers.size()) == c.num_layers, "layers.size() != num_layers");
  Require(w.embed.data.size() == static_cast<size_t>(c.vocab_size) * D, "embedding has the wrong size");

  std::vector<std::vector<double>> x(T, std::vector<double>(D));
  for (int64_t t = 0; t < T; ++t) {
    Require(tokens[t] >= 0 && tokens[t] < c.vocab_size, "token id out of range");
    for (int64_t e = 0; e < D; ++e) x[t][e] = w.embed.data[tokens[t] * D + e];
  }

  for (const LayerWeights& L : w.layers) {
    std::vector<std::vector<double>> xn(T);
    for (int64_t t = 0; t < T; ++t) xn[t] = RmsNorm(x[t], L.attn_norm, eps, "attn_norm");
    const std::vector<std::vector<double>> attn =
        c.arch == Architecture::kLlama ? DenseAttention(c, L, xn) : NsaAttention(c, L, xn);
    for (int64_t t = 0; t < T; ++t) {
      const std::vector<double> o = Linear(L.o_proj, attn[t], nullptr, "o_proj");
      for (int64_t e = 0; e < D; ++e) x[t][e] += o[e];
      const std::vector<double> hn = RmsNorm(x[t], L.mlp_norm, eps, "mlp_norm");
      const std::vector<double> gate = Linear(L.gate_proj, hn, nullptr, "gate_proj");
      const std::vector<double> up = Linear(L.up_proj, hn, nullptr, "up_proj");
      std::vector<double> act(gate.size());
      for (size_t i = 0; i < act.size(); ++i) act[i] = Silu(gate[i]) * up[i];
      const std::vector<double> down = Linear(L.down_proj, act, nullptr, "down_proj");
      for (int64_t e = 0; e < D; ++e) x[t][e] += down[e];
    }
  }

  std::vector<std::vector<float>> logits(T);
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<double> f = RmsNorm(x[t], w.final_norm, eps, "final norm");
    const std::vector<double> y = Linear(w.LmHead(), f, nullptr, "lm_head");
    logits[t].assign(y.begin(), y.end());
  }
  return logits;
}

}  // namespace needle::testing
