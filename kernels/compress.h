// NSA compression on block completion: produces compressed K/V tokens into the paged compressed pool.
// Two variants:
//   mean (nsa, llama-nsa): K_cmp/V_cmp = mean of raw rows [i*d, i*d + l) of the (post-RoPE) cache;
//   MLP (nsa-paper): phi(X) = fc2 · silu(fc1 · flatten(X + pos)) over the block's pre-RoPE rows
//   (from the staging ring and/or the step's chunk buffer), then RoPE of the compressed key at
//   position i*d (values get none).
// The host lists the compressed tokens to produce (CompressItem, one per sequence and block) and
// where each one's raw rows live; the kernels do all KV heads of every item. They never decide which
// blocks are complete, and they read rows the caller guarantees are present.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/kv_append.h"

namespace needle::kernels {

// One compressed token to produce (for every KV head). Host-packed, device array.
struct CompressItem {
  int64_t start = 0;             // first raw row (position) of the block: i * d; the key's RoPE position
  int64_t tail_start = INT64_MAX;  // raw rows >= tail_start come from the tail buffer (INT64_MAX: none)
  int64_t dst_slot = 0;          // destination in the compressed pool: page * rows_per_page + row
  int32_t table_offset = 0;      // where this item's sequence's page table starts in page_table
  int32_t tail_row0 = 0;         // tail buffer row that holds position tail_start
};

// Where the raw rows of the items live. Row i of KV head h of an item:
//   i >= item.tail_start: k_tail[(item.tail_row0 + i - item.tail_start) * k_tail_stride + h * d_k + c]
//   otherwise:            pool row of slot page_table[item.table_offset + logical] * rows_per_page
//                         + i % rows_per_page, logical = i / rows_per_page (mod ring_pages if > 0).
struct CompressSource {
  PagedPool k_pool;  // read only; rows_per_page and num_kv_heads shared with v_pool
  PagedPool v_pool;
  const int32_t* page_table = nullptr;  // int32, concatenated per-sequence page tables
  int ring_pages = 0;                   // 0: linear page table; staging ring: 1 (rows_per_page = l)
  const __nv_bfloat16* k_tail = nullptr;  // bf16 [chunk rows][k_tail_stride]; nullptr if unused
  int64_t k_tail_stride = 0;
  const __nv_bfloat16* v_tail = nullptr;  // bf16 [chunk rows][v_tail_stride]
  int64_t v_tail_stride = 0;
};

struct CompressMeanParams {
  int num_items = 0;
  const CompressItem* items = nullptr;  // [num_items]
  int block_len = 0;                    // l
  CompressSource src;                   // post-RoPE rows (the selection cache)
  PagedPool k_dst;                      // compressed pool, K (head_dim d_k)
  PagedPool v_dst;                      // compressed pool, V (head_dim d_v)
};

// K_cmp = mean of the l key rows, V_cmp likewise, accumulated in fp32.
cudaError_t LaunchCompressMean(const CompressMeanParams& params, cudaStream_t stream);

struct CompressMlpParams {
  int num_items = 0;
  const CompressItem* items = nullptr;  // [num_items]
  int block_len = 0;                    // l
  int hidden = 0;                       // hidden width of phi
  double rope_theta = 10000.0;
  CompressSource src;                   // pre-RoPE cmp-branch rows (staging ring + chunk buffer)
  PagedPool k_dst;
  PagedPool v_dst;
  // phi's weights, shared by the KV heads of the layer (bf16, PyTorch layout [out][in]).
  const __nv_bfloat16* k_pos = nullptr;  // [l][d_k]
  const __nv_bfloat16* k_fc1 = nullptr;  // [hidden][l * d_k]
  const __nv_bfloat16* k_fc2 = nullptr;  // [d_k][hidden]
  const __nv_bfloat16* v_pos = nullptr;  // [l][d_v]
  const __nv_bfloat16* v_fc1 = nullptr;  // [hidden][l * d_v]
  const __nv_bfloat16* v_fc2 = nullptr;  // [d_v][hidden]
};

// Device workspace for LaunchCompressMlp (fp32 hidden activations of every item, head, K and V).
size_t CompressMlpWorkspaceBytes(int num_items, int num_kv_heads, int hidden);

// Whether the MLP kernel can stage one block's flattened rows (l * max(d_k, d_v) fp32) on chip.
bool CompressMlpSupported(int block_len, int head_dim_k, int head_dim_v);

// fp32 throughout (bf16 inputs and weights), one rounding to bf16 at the store. `workspace` holds
// CompressMlpWorkspaceBytes(num_items, k_dst.num_kv_heads, hidden) bytes.
cudaError_t LaunchCompressMlp(const CompressMlpParams& params, void* workspace, cudaStream_t stream);

}  // namespace needle::kernels
