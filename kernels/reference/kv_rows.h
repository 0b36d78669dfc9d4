// KvRows: where row `i` (a token position, or a compressed-token index) of one KV head of one layer
// lives. Rows below `tail_start` come from a paged store (optionally a ring of pages); rows from
// `tail_start` on come from a contiguous buffer (a prefill chunk's fresh K/V not yet in the cache).
// The same description serves the CPU executor's caches and the tests' contiguous tensors.
#pragma once

#include <cstdint>

namespace needle::kernels::reference {

struct KvRows {
  // Paged part. Element (row i, column c) is at
  //   base[page_table[(i / page_rows) % ring_pages] * page_stride + offset + (i % page_rows) * row_stride + c]
  // (ring_pages == 0: no ring, the logical page is i / page_rows).
  const float* base = nullptr;
  const int32_t* page_table = nullptr;
  int64_t page_stride = 0;  // elements between consecutive physical pages
  int64_t offset = 0;       // element offset of this layer and KV head inside a page
  int64_t row_stride = 0;   // elements between consecutive rows of a page
  int page_rows = 1;        // rows per page
  int ring_pages = 0;       // > 0: logical pages wrap around a ring of this many pages

  // Contiguous part: rows >= tail_start are tail[(i - tail_start) * tail_stride + c].
  const float* tail = nullptr;
  int64_t tail_start = INT64_MAX;
  int64_t tail_stride = 0;

  const float* Row(int64_t i) const {
    if (i >= tail_start) return tail + (i - tail_start) * tail_stride;
    int64_t logical = i / page_rows;
    if (ring_pages > 0) logical %= ring_pages;
    return base + page_table[logical] * page_stride + offset + (i % page_rows) * row_stride;
  }

  // A plain contiguous [rows][stride] array.
  static KvRows Contiguous(const float* data, int64_t stride) {
    KvRows r;
    r.tail = data;
    r.tail_start = 0;
    r.tail_stride = stride;
    return r;
  }
};

}  // namespace needle::kernels::reference
