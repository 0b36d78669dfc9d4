// Device helpers shared by the non-attention op kernels: bf16 conversion, the RoPE angle arithmetic
// (kept bit-compatible with kernels/reference/ops_ref.cc), warp/block reductions and paged-row
// addressing. Device code only; include from .cu files, never from a launcher header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kv_append.h"

namespace needle::kernels {

__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __nv_bfloat16 ToBf16(float x) { return __float2bfloat16_rn(x); }

// inv_freq_i = theta^(-2i/d), computed in double and rounded to fp32, exactly as ApplyRope does.
__device__ __forceinline__ float RopeInvFreq(int i, int d, double theta) {
  return static_cast<float>(1.0 / pow(theta, (2.0 * i) / d));
}

// cos and sin (double) of the fp32 angle float(pos) * inv_freq, as ApplyRope computes them.
__device__ __forceinline__ void RopeCosSin(int64_t pos, float inv_freq, double* c, double* s) {
  const float angle = __fmul_rn(static_cast<float>(pos), inv_freq);
  sincos(static_cast<double>(angle), s, c);
}

template <typename T>
__device__ __forceinline__ T WarpSum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds at least 32 values.
// blockDim.x must be a multiple of 32.
template <typename T>
__device__ __forceinline__ T BlockSum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = WarpSum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < warps ? scratch[lane] : T(0);
  return WarpSum(r);
}

__device__ __forceinline__ float BlockMax(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = WarpMax(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < warps ? scratch[lane] : -INFINITY;
  return WarpMax(r);
}

// Address of (slot's page, row) of one KV head in a pool; slot = page * rows_per_page + row.
template <typename T>
__device__ __forceinline__ T* PoolRow(const PagedPool& pool, int head, int64_t slot) {
  const int64_t page = slot / pool.rows_per_page, row = slot % pool.rows_per_page;
  return reinterpret_cast<T*>(pool.base) + page * pool.page_stride +
         (static_cast<int64_t>(pool.layer) * pool.num_kv_heads + head) * pool.rows_per_page * pool.head_dim +
         row * pool.head_dim;
}

}  // namespace needle::kernels
