// KV append: copies the new K/V rows of a step into a paged bf16 cache through a slot mapping the host
// computed (one destination per token). The same kernel fills the selection pool, the window ring and
// the staging ring: ring arithmetic lives in the slot mapping, not here. Also defines PagedPool, the
// description of one paged K or V pool that the other cache kernels share. Does not decide which
// tokens go where, and does not order writes: at most one token of a launch may target a slot.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace needle::kernels {

// One K or V pool: element (page p, layer L, kv head h, row r, col c) lives at
//   base[p * page_stride + (L * num_kv_heads + h) * rows_per_page * head_dim + r * head_dim + c].
struct PagedPool {
  __nv_bfloat16* base = nullptr;  // bf16 [num_pages][num_layers][num_kv_heads][rows_per_page][head_dim]
  int64_t page_stride = 0;        // elements between pages (num_layers * num_kv_heads * rows_per_page * head_dim)
  int layer = 0;                  // the layer this launch reads or writes
  int num_kv_heads = 0;
  int rows_per_page = 0;  // tokens per page (P), compressed tokens per page (Pc) or l (staging)
  int head_dim = 0;       // d_k for K pools, d_v for V pools
};

// The slot of position `pos` in a sequence's page table: page * rows_per_page + row. With
// ring_pages > 0 the logical page wraps around a ring of that many pages (window ring: ceil(w/P)+1
// pages of P rows; staging: 1 page of l rows). Host helper for building slot mappings.
inline int64_t SlotForPosition(const int32_t* page_table, int rows_per_page, int ring_pages, int64_t pos) {
  int64_t logical = pos / rows_per_page;
  if (ring_pages > 0) logical %= ring_pages;
  return static_cast<int64_t>(page_table[logical]) * rows_per_page + pos % rows_per_page;
}

struct KvAppendParams {
  int num_tokens = 0;
  // New rows, bf16 [num_tokens][k_stride]: KV head h at columns [h * k_pool.head_dim, (h+1) * head_dim).
  // The stride lets the rows sit inside a fused QKV projection output.
  const __nv_bfloat16* k = nullptr;
  int64_t k_stride = 0;
  // Same for V (bf16 [num_tokens][v_stride]); nullptr (with v_pool.base == nullptr): K only.
  const __nv_bfloat16* v = nullptr;
  int64_t v_stride = 0;
  // int64 [num_tokens]: destination slot = page * rows_per_page + row; -1 skips the token (a ring
  // row that a later token of the same launch overwrites must be skipped by the host).
  const int64_t* slots = nullptr;
  PagedPool k_pool;  // num_kv_heads and rows_per_page must match v_pool's
  PagedPool v_pool;
};

cudaError_t LaunchKvAppend(const KvAppendParams& params, cudaStream_t stream);

}  // namespace needle::kernels
