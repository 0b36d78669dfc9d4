// Naive CPU reference for the element-wise and matrix ops of a transformer layer: RMSNorm, linear
// layers, RoPE, SwiGLU, gates and NSA's compression functions. fp32 in and out, double accumulation.
// Shapes follow PyTorch: a linear weight is [out][in], row-major.
#pragma once

#include <cstdint>

#include "kernels/reference/kv_rows.h"

namespace needle::kernels::reference {

// y[n] = x[n] / sqrt(mean(x^2) + eps) * w[n]
void RmsNorm(const float* x, const float* w, int n, float eps, float* y);

// y[out] = W[out][in] · x[in] (+ bias[out] if bias != nullptr)
void Linear(const float* W, const float* bias, const float* x, int in, int out, float* y);

// Rotate-half RoPE on one head vector of dimension d (pairs i and i + d/2), in place:
// angle_i = float(pos) * inv_freq_i with inv_freq_i = theta^(-2i/d) computed in fp32.
void ApplyRope(float* x, int d, int64_t pos, double theta);

// y[i] = silu(gate[i]) * up[i]
void SwiGlu(const float* gate, const float* up, int n, float* y);

float Sigmoid(float x);

// Mean of rows [start, start + len) of `rows`: out[d].
void MeanRows(const KvRows& rows, int64_t start, int len, int d, float* out);

// nsa-paper compression of rows [start, start + l) of one KV head (pre-RoPE), shape [l][d]:
// out[d] = fc2[d][hidden] · silu(fc1[hidden][l*d] · flatten(X + pos[l][d])).
void MlpCompress(const KvRows& rows, int64_t start, int l, int d, const float* pos, const float* fc1,
                 const float* fc2, int hidden, float* out);

}  // namespace needle::kernels::reference
