// Compression kernels.
//   Mean: grid (items, KV heads, K|V); threads over columns, l rows summed in fp32.
//   MLP, two kernels:
//     Fc1: grid (items * heads, hidden tiles, K|V). The block stages x = flatten(X + pos) (fp32, l*d)
//          in shared memory, each warp takes rows of fc1, h = silu(fc1 · x) goes to the workspace.
//     Fc2: grid (items * heads, K|V). Stages h, each warp takes output columns, then RoPE on the key
//          (double cos/sin as in ApplyRope) and one store to the compressed pool.
//   The weights are re-read per item (from L2 when many items share a launch); the work is small.
#include "kernels/compress.h"

#include "kernels/ops_common.cuh"

namespace needle::kernels {
namespace {

constexpr int kMeanThreads = 128;
constexpr int kMlpThreads = 256;
constexpr int kFc1RowsPerBlock = 32;
constexpr size_t kMaxStageBytes = 200 * 1024;  // below the 227 KB opt-in limit of sm_90

// Row i of KV head h of an item, from the tail buffer or the paged pool.
__device__ __forceinline__ const __nv_bfloat16* RawRow(const CompressSource& s, bool value, const CompressItem& it,
                                                       int h, int64_t i) {
  const PagedPool& pool = value ? s.v_pool : s.k_pool;
  if (i >= it.tail_start) {
    const __nv_bfloat16* tail = value ? s.v_tail : s.k_tail;
    const int64_t stride = value ? s.v_tail_stride : s.k_tail_stride;
    return tail + (it.tail_row0 + (i - it.tail_start)) * stride + static_cast<int64_t>(h) * pool.head_dim;
  }
  int64_t logical = i / pool.rows_per_page;
  if (s.ring_pages > 0) logical %= s.ring_pages;
  const int64_t slot = static_cast<int64_t>(s.page_table[it.table_offset + logical]) * pool.rows_per_page +
                       i % pool.rows_per_page;
  return PoolRow<const __nv_bfloat16>(pool, h, slot);
}

__global__ void CompressMeanKernel(CompressMeanParams p) {
  const CompressItem it = p.items[blockIdx.x];
  const int h = blockIdx.y;
  const bool value = blockIdx.z == 1;
  const PagedPool& dst = value ? p.v_dst : p.k_dst;
  const int d = dst.head_dim;
  __nv_bfloat16* out = PoolRow<__nv_bfloat16>(dst, h, it.dst_slot);
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.0f;
    for (int r = 0; r < p.block_len; ++r) acc += ToFloat(RawRow(p.src, value, it, h, it.start + r)[c]);
    out[c] = ToBf16(acc / static_cast<float>(p.block_len));
  }
}

// h[item, head, which][j] = silu(fc1[j] · flatten(X + pos)).
__global__ void CompressFc1Kernel(CompressMlpParams p, float* hidden_out) {
  extern __shared__ float x[];  // [l * d]
  const int heads = p.k_dst.num_kv_heads;
  const int item = blockIdx.x / heads, h = blockIdx.x % heads;
  const bool value = blockIdx.z == 1;
  const CompressItem it = p.items[item];
  const int d = value ? p.v_dst.head_dim : p.k_dst.head_dim;
  const int n = p.block_len * d;
  const __nv_bfloat16* pos = value ? p.v_pos : p.k_pos;
  const __nv_bfloat16* fc1 = value ? p.v_fc1 : p.k_fc1;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int r = e / d, c = e - r * d;
    x[e] = ToFloat(RawRow(p.src, value, it, h, it.start + r)[c]) + ToFloat(pos[e]);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float* hout = hidden_out + ((static_cast<int64_t>(item) * heads + h) * 2 + (value ? 1 : 0)) * p.hidden;
  const int j_end = min(p.hidden, static_cast<int>(blockIdx.y + 1) * kFc1RowsPerBlock);
  for (int j = blockIdx.y * kFc1RowsPerBlock + warp; j < j_end; j += warps) {
    const __nv_bfloat16* w = fc1 + static_cast<int64_t>(j) * n;
    float acc = 0.0f;
    for (int e = lane; e < n; e += 32) acc = fmaf(ToFloat(w[e]), x[e], acc);
    acc = WarpSum(acc);
    if (lane == 0) hout[j] = acc / (1.0f + expf(-acc));
  }
}

// out = fc2 · h, RoPE on the key at position start, store.
__global__ void CompressFc2Kernel(CompressMlpParams p, const float* hidden_in) {
  extern __shared__ float smem[];  // [hidden] h, then [d] out
  const int heads = p.k_dst.num_kv_heads;
  const int item = blockIdx.x / heads, h = blockIdx.x % heads;
  const bool value = blockIdx.y == 1;
  const CompressItem it = p.items[item];
  const PagedPool& dst = value ? p.v_dst : p.k_dst;
  const int d = dst.head_dim;
  const __nv_bfloat16* fc2 = value ? p.v_fc2 : p.k_fc2;
  float* hs = smem;
  float* out = smem + p.hidden;
  const float* hin = hidden_in + ((static_cast<int64_t>(item) * heads + h) * 2 + (value ? 1 : 0)) * p.hidden;
  for (int j = threadIdx.x; j < p.hidden; j += blockDim.x) hs[j] = hin[j];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int c = warp; c < d; c += warps) {
    const __nv_bfloat16* w = fc2 + static_cast<int64_t>(c) * p.hidden;
    float acc = 0.0f;
    for (int j = lane; j < p.hidden; j += 32) acc = fmaf(ToFloat(w[j]), hs[j], acc);
    acc = WarpSum(acc);
    if (lane == 0) out[c] = acc;
  }
  __syncthreads();
  __nv_bfloat16* row = PoolRow<__nv_bfloat16>(dst, h, it.dst_slot);
  if (value) {
    for (int c = threadIdx.x; c < d; c += blockDim.x) row[c] = ToBf16(out[c]);
    return;
  }
  const int half = d / 2;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    double cs, sn;
    RopeCosSin(it.start, RopeInvFreq(i, d, p.rope_theta), &cs, &sn);
    const double a = out[i], b = out[i + half];
    row[i] = ToBf16(static_cast<float>(a * cs - b * sn));
    row[i + half] = ToBf16(static_cast<float>(b * cs + a * sn));
  }
}

// Dynamic shared memory beyond the default 48 KB needs an explicit opt-in per kernel.
template <typename Kernel>
cudaError_t AllowSharedMemory(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

bool PoolOk(const PagedPool& pool) {
  return pool.base != nullptr && pool.head_dim > 0 && pool.rows_per_page > 0 && pool.num_kv_heads > 0;
}

bool SourceOk(const CompressSource& s) {
  return PoolOk(s.k_pool) && PoolOk(s.v_pool) && s.k_pool.num_kv_heads == s.v_pool.num_kv_heads &&
         s.k_pool.rows_per_page == s.v_pool.rows_per_page && s.ring_pages >= 0;
}

bool DestOk(const PagedPool& k, const PagedPool& v, const CompressSource& s) {
  return PoolOk(k) && PoolOk(v) && k.num_kv_heads == s.k_pool.num_kv_heads &&
         v.num_kv_heads == s.k_pool.num_kv_heads && k.head_dim == s.k_pool.head_dim &&
         v.head_dim == s.v_pool.head_dim && k.rows_per_page == v.rows_per_page;
}

}  // namespace

cudaError_t LaunchCompressMean(const CompressMeanParams& p, cudaStream_t stream) {
  if (p.num_items == 0) return cudaSuccess;
  if (p.num_items < 0 || p.items == nullptr || p.block_len <= 0 || !SourceOk(p.src) ||
      !DestOk(p.k_dst, p.v_dst, p.src) || p.k_dst.num_kv_heads > 65535) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(p.num_items, p.k_dst.num_kv_heads, 2);
  CompressMeanKernel<<<grid, kMeanThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

size_t CompressMlpWorkspaceBytes(int num_items, int num_kv_heads, int hidden) {
  return sizeof(float) * 2 * static_cast<size_t>(num_items) * num_kv_heads * hidden;
}

bool CompressMlpSupported(int block_len, int head_dim_k, int head_dim_v) {
  const int d = head_dim_k > head_dim_v ? head_dim_k : head_dim_v;
  return block_len > 0 && head_dim_k > 0 && head_dim_k % 2 == 0 && head_dim_v > 0 &&
         sizeof(float) * static_cast<size_t>(block_len) * d <= kMaxStageBytes;
}

cudaError_t LaunchCompressMlp(const CompressMlpParams& p, void* workspace, cudaStream_t stream) {
  if (p.num_items == 0) return cudaSuccess;
  if (p.num_items < 0 || p.items == nullptr || p.hidden <= 0 || workspace == nullptr || !SourceOk(p.src) ||
      !DestOk(p.k_dst, p.v_dst, p.src) ||
      !CompressMlpSupported(p.block_len, p.k_dst.head_dim, p.v_dst.head_dim) || p.k_pos == nullptr ||
      p.k_fc1 == nullptr || p.k_fc2 == nullptr || p.v_pos == nullptr || p.v_fc1 == nullptr || p.v_fc2 == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int heads = p.k_dst.num_kv_heads;
  const int64_t rows = static_cast<int64_t>(p.num_items) * heads;
  const int hidden_tiles = (p.hidden + kFc1RowsPerBlock - 1) / kFc1RowsPerBlock;
  if (rows > INT32_MAX || hidden_tiles > 65535) return cudaErrorInvalidValue;
  const int dmax = p.k_dst.head_dim > p.v_dst.head_dim ? p.k_dst.head_dim : p.v_dst.head_dim;
  const size_t stage = sizeof(float) * static_cast<size_t>(p.block_len) * dmax;
  const size_t smem2 = sizeof(float) * (static_cast<size_t>(p.hidden) + dmax);
  if (smem2 > kMaxStageBytes) return cudaErrorInvalidValue;
  cudaError_t err = AllowSharedMemory(CompressFc1Kernel, stage);
  if (err != cudaSuccess) return err;
  err = AllowSharedMemory(CompressFc2Kernel, smem2);
  if (err != cudaSuccess) return err;
  float* hidden = static_cast<float*>(workspace);
  const dim3 grid1(static_cast<unsigned>(rows), hidden_tiles, 2);
  CompressFc1Kernel<<<grid1, kMlpThreads, stage, stream>>>(p, hidden);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid2(static_cast<unsigned>(rows), 2);
  CompressFc2Kernel<<<grid2, kMlpThreads, smem2, stream>>>(p, hidden);
  return cudaGetLastError();
}

}  // namespace needle::kernels
