// Naive attention reference: loops over rows, double accumulators, no blocking or tiling.
#include "kernels/reference/attention_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace needle::kernels::reference {
namespace {

double Dot(const float* a, const float* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

}  // namespace

void AttendRanges(const float* q, int G, int dk, int dv, const KvRows& k, const KvRows& v,
                  const RowRange* ranges, int num_ranges, float scale, float* out, double* lse) {
  std::vector<double> scores;
  std::vector<double> acc(dv);
  for (int h = 0; h < G; ++h) {
    const float* qh = q + static_cast<int64_t>(h) * dk;
    scores.clear();
    double m = -std::numeric_limits<double>::infinity();
    for (int r = 0; r < num_ranges; ++r) {
      for (int64_t i = ranges[r].begin; i < ranges[r].end; ++i) {
        double s = scale * Dot(qh, k.Row(i), dk);
        scores.push_back(s);
        m = std::max(m, s);
      }
    }
    float* oh = out + static_cast<int64_t>(h) * dv;
    if (scores.empty()) {
      std::fill(oh, oh + dv, 0.0f);
      if (lse) lse[h] = -std::numeric_limits<double>::infinity();
      continue;
    }
    std::fill(acc.begin(), acc.end(), 0.0);
    double denom = 0;
    size_t idx = 0;
    for (int r = 0; r < num_ranges; ++r) {
      for (int64_t i = ranges[r].begin; i < ranges[r].end; ++i) {
        double p = std::exp(scores[idx++] - m);
        denom += p;
        const float* vi = v.Row(i);
        for (int c = 0; c < dv; ++c) acc[c] += p * vi[c];
      }
    }
    for (int c = 0; c < dv; ++c) oh[c] = static_cast<float>(acc[c] / denom);
    if (lse) lse[h] = m + std::log(denom);
  }
}

std::vector<double> BlockScores(const float* q, int G, int dk, const KvRows& kc, int64_t t,
                                const double* lse, float scale, const NsaGeometry& g) {
  const int64_t num_blocks = t / g.sel_block + 1;
  std::vector<double> scores(num_blocks, 0.0);
  const int64_t nc = g.NumCompressed(t);
  const bool identity = g.cmp_block == g.cmp_stride && g.cmp_stride == g.sel_block;
  for (int h = 0; h < G; ++h) {
    const float* qh = q + static_cast<int64_t>(h) * dk;
    for (int64_t i = 0; i < nc; ++i) {
      double p = std::exp(scale * Dot(qh, kc.Row(i), dk) - lse[h]);
      if (identity) {
        if (i < num_blocks) scores[i] += p;
        continue;
      }
      // Compressed token i covers [i*d, i*d + l); spread p over the blocks it overlaps, in units of d.
      const int64_t lo = i * g.cmp_stride, hi = lo + g.cmp_block;
      for (int64_t j = lo / g.sel_block; j <= (hi - 1) / g.sel_block && j < num_blocks; ++j) {
        const int64_t overlap = std::min(hi, (j + 1) * g.sel_block) - std::max(lo, j * g.sel_block);
        if (overlap > 0) scores[j] += p * static_cast<double>(overlap) / g.cmp_stride;
      }
    }
  }
  return scores;
}

std::vector<int64_t> SelectBlocks(const std::vector<double>& scores, int64_t t, const NsaGeometry& g) {
  const int64_t num_blocks = t / g.sel_block + 1;
  std::vector<int64_t> chosen;
  if (num_blocks <= g.num_selected) {
    for (int64_t j = 0; j < num_blocks; ++j) chosen.push_back(j);
    return chosen;
  }
  const int64_t current = t / g.sel_block;
  // Forced blocks outrank every score; the rest rank by score, ties to the lower index.
  std::vector<char> forced(num_blocks, 0);
  for (int64_t j = 0; j < g.forced_initial && j < num_blocks; ++j) forced[j] = 1;
  for (int64_t j = 0; j < g.forced_local && current - j >= 0; ++j) forced[current - j] = 1;
  auto better = [&](int64_t a, int64_t b) {
    if (forced[a] != forced[b]) return forced[a] > forced[b];
    if (forced[a]) return a < b;
    if (scores[a] != scores[b]) return scores[a] > scores[b];
    return a < b;
  };
  auto best = [&](int64_t begin, int64_t end, size_t k) {
    std::vector<int64_t> v;
    for (int64_t j = begin; j < end; ++j) v.push_back(j);
    std::sort(v.begin(), v.end(), better);
    if (v.size() > k) v.resize(k);
    return v;
  };
  const int64_t C = g.topk_merge_chunk;
  std::vector<int64_t> pool;
  if (C > 0 && g.num_selected > C / 2 && current >= C) {
    const int64_t chunk_start = (current / C) * C;
    pool = best(0, chunk_start, static_cast<size_t>(C / 2));
    std::vector<int64_t> cur = best(chunk_start, num_blocks, static_cast<size_t>(C / 2));
    pool.insert(pool.end(), cur.begin(), cur.end());
    std::sort(pool.begin(), pool.end(), better);
  } else {
    pool = best(0, num_blocks, static_cast<size_t>(num_blocks));
  }
  for (size_t i = 0; i < pool.size() && chosen.size() < static_cast<size_t>(g.num_selected); ++i) {
    chosen.push_back(pool[i]);
  }
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

std::vector<RowRange> SelectedRanges(const std::vector<int64_t>& blocks, int64_t t, int sel_block) {
  std::vector<RowRange> ranges;
  for (int64_t j : blocks) {
    int64_t begin = j * sel_block, end = std::min<int64_t>((j + 1) * sel_block, t + 1);
    if (begin < end) ranges.push_back({begin, end});
  }
  return ranges;
}

void NsaAttention(const float* q, const float* gates, int G, int dk, int dv, const NsaBranchRows& rows,
                  int64_t t, float scale, const NsaGeometry& g, float* out,
                  std::vector<int64_t>* selected_blocks) {
  std::vector<float> o_cmp(static_cast<size_t>(G) * dv), o_slc(o_cmp.size()), o_win(o_cmp.size(), 0.0f);
  std::vector<double> lse(G);
  const RowRange cmp_range{0, g.NumCompressed(t)};
  AttendRanges(q, G, dk, dv, rows.kc, rows.vc, &cmp_range, 1, scale, o_cmp.data(), lse.data());

  std::vector<double> scores = BlockScores(q, G, dk, rows.kc, t, lse.data(), scale, g);
  std::vector<int64_t> blocks = SelectBlocks(scores, t, g);
  std::vector<RowRange> ranges = SelectedRanges(blocks, t, g.sel_block);
  AttendRanges(q, G, dk, dv, rows.ks, rows.vs, ranges.data(), static_cast<int>(ranges.size()), scale,
               o_slc.data(), nullptr);
  if (g.window > 0) {
    const RowRange win = WindowRange(t, g.window);
    AttendRanges(q, G, dk, dv, rows.kw, rows.vw, &win, 1, scale, o_win.data(), nullptr);
  }
  for (int h = 0; h < G; ++h) {
    const float* gh = gates + 3 * h;
    for (int c = 0; c < dv; ++c) {
      const size_t i = static_cast<size_t>(h) * dv + c;
      out[i] = static_cast<float>(static_cast<double>(gh[0]) * o_cmp[i] + static_cast<double>(gh[1]) * o_slc[i] +
                                  static_cast<double>(gh[2]) * o_win[i]);
    }
  }
  if (selected_blocks) *selected_blocks = std::move(blocks);
}

void DenseAttention(const float* q, int G, int dk, int dv, const KvRows& k, const KvRows& v, int64_t t,
                    float scale, float* out) {
  const RowRange all{0, t + 1};
  AttendRanges(q, G, dk, dv, k, v, &all, 1, scale, out, nullptr);
}

}  // namespace needle::kernels::reference
