// Naive op reference: straightforward loops, double accumulators.
#include "kernels/reference/ops_ref.h"

#include <cmath>
#include <vector>

namespace needle::kernels::reference {

void RmsNorm(const float* x, const float* w, int n, float eps, float* y) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const double inv = 1.0 / std::sqrt(ss / n + eps);
  for (int i = 0; i < n; ++i) y[i] = static_cast<float>(x[i] * inv * w[i]);
}

void Linear(const float* W, const float* bias, const float* x, int in, int out, float* y) {
  for (int o = 0; o < out; ++o) {
    const float* row = W + static_cast<int64_t>(o) * in;
    double s = bias ? bias[o] : 0.0;
    for (int i = 0; i < in; ++i) s += static_cast<double>(row[i]) * x[i];
    y[o] = static_cast<float>(s);
  }
}

void ApplyRope(float* x, int d, int64_t pos, double theta) {
  const int half = d / 2;
  for (int i = 0; i < half; ++i) {
    const float inv_freq = static_cast<float>(1.0 / std::pow(theta, (2.0 * i) / d));
    const float angle = static_cast<float>(pos) * inv_freq;
    const double c = std::cos(static_cast<double>(angle)), s = std::sin(static_cast<double>(angle));
    const double a = x[i], b = x[i + half];
    x[i] = static_cast<float>(a * c - b * s);
    x[i + half] = static_cast<float>(b * c + a * s);
  }
}

float Sigmoid(float x) { return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(x)))); }

void SwiGlu(const float* gate, const float* up, int n, float* y) {
  for (int i = 0; i < n; ++i) {
    const double g = gate[i];
    y[i] = static_cast<float>(g / (1.0 + std::exp(-g)) * up[i]);
  }
}

void MeanRows(const KvRows& rows, int64_t start, int len, int d, float* out) {
  std::vector<double> acc(d, 0.0);
  for (int r = 0; r < len; ++r) {
    const float* row = rows.Row(start + r);
    for (int c = 0; c < d; ++c) acc[c] += row[c];
  }
  for (int c = 0; c < d; ++c) out[c] = static_cast<float>(acc[c] / len);
}

void MlpCompress(const KvRows& rows, int64_t start, int l, int d, const float* pos, const float* fc1,
                 const float* fc2, int hidden, float* out) {
  std::vector<float> x(static_cast<size_t>(l) * d);
  for (int r = 0; r < l; ++r) {
    const float* row = rows.Row(start + r);
    for (int c = 0; c < d; ++c) x[static_cast<size_t>(r) * d + c] = row[c] + pos[static_cast<size_t>(r) * d + c];
  }
  std::vector<float> h(hidden);
  Linear(fc1, nullptr, x.data(), l * d, hidden, h.data());
  for (int i = 0; i < hidden; ++i) {
    const double v = h[i];
    h[i] = static_cast<float>(v / (1.0 + std::exp(-v)));
  }
  Linear(fc2, nullptr, h.data(), hidden, d, out);
}

}  // namespace needle::kernels::reference
