// PagedKvCache: where an attention kernel finds row r of KV head h of one sequence in one paged K/V
// pool (one cache kind: selection, compressed, window or the dense cache; one layer). Shared by the
// attention kernels' params structs. Plain data, compiles with g++; owns no memory.
//
// The pool layout is the one kernels/reference/kv_rows.h describes for the CPU executor: element
// (physical page p, layer L, KV head h, row r, column c) at
//   base[p * page_stride + (L * Hkv + h) * page_rows * d + r * d + c]
// with K and V in separate arrays (V with d_v columns). The caller passes `k`/`v` already offset to
// the layer (base + L * Hkv * page_rows * d), so the kernel computes
//   k[page * k_page_stride + (h * page_rows + r) * d_k + c].
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace needle::kernels {

struct PagedKvCache {
  // [num_pages][num_layers][Hkv][page_rows][d_k] bf16, offset to the layer.
  const __nv_bfloat16* k = nullptr;
  // [num_pages][num_layers][Hkv][page_rows][d_v] bf16, offset to the layer.
  const __nv_bfloat16* v = nullptr;
  int64_t k_page_stride = 0;  // elements between physical pages of k: num_layers * Hkv * page_rows * d_k
  int64_t v_page_stride = 0;  // elements between physical pages of v: num_layers * Hkv * page_rows * d_v
  // [num_seqs][table_stride] int32: physical page of logical page i of sequence s at
  // page_table[s * table_stride + i]. Logical page of row r: r / page_rows, or
  // (r / page_rows) % ring_pages when ring_pages > 0.
  const int32_t* page_table = nullptr;
  int32_t table_stride = 0;
  int32_t page_rows = 0;   // rows (tokens, or compressed tokens) per page
  int32_t ring_pages = 0;  // > 0: logical pages wrap around a ring of this many pages (window cache)
  // Physical pages in the pool (0: unknown). Known, the split-KV decode kernels may copy whole-page
  // chunks with tensor-map boxes, which need the pool's extent.
  int32_t num_pages = 0;
};

}  // namespace needle::kernels
