// Helpers shared by the GPU kernel tests (label `gpu`): GPU presence check, bf16 rounding on the host,
// seeded random fills, device buffers, a host image of a paged K/V pool with page scattering (and a
// whole paged cache on the device, kernels/paged_kv.h's layout), and an element-wise closeness check. Header-only; compiled by g++ against the CUDA runtime API. It must
// not grow kernel-specific logic: each test owns its cases and reference calls.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/paged_kv.h"

namespace needle::gpu_test {

// ---- GPU presence -------------------------------------------------------------------------------

// True when at least one CUDA device is usable (evaluated once per process).
inline bool HasGpu() {
  static const bool has = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error
      return false;
    }
    return n > 0;
  }();
  return has;
}

// NEEDLE_REQUIRE_GPU=1 turns "no GPU" skips into failures (set on the device machine).
inline bool GpuRequired() {
  const char* e = std::getenv("NEEDLE_REQUIRE_GPU");
  return e != nullptr && std::strcmp(e, "1") == 0;
}

}  // namespace needle::gpu_test

// First statement of every GPU test body: skips without a GPU, fails instead when it is required.
#define NEEDLE_SKIP_WITHOUT_GPU()                                                            \
  do {                                                                                       \
    if (!::needle::gpu_test::HasGpu()) {                                                     \
      if (::needle::gpu_test::GpuRequired()) FAIL() << "no usable CUDA device, but NEEDLE_REQUIRE_GPU=1"; \
      GTEST_SKIP() << "no usable CUDA device";                                               \
    }                                                                                        \
  } while (0)

// ASSERTs that a CUDA runtime call returned cudaSuccess, naming the call and the error.
#define NEEDLE_CUDA_ASSERT(expr)                                                          \
  do {                                                                                    \
    const cudaError_t needle_cuda_err_ = (expr);                                          \
    ASSERT_EQ(needle_cuda_err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(needle_cuda_err_); \
  } while (0)

namespace needle::gpu_test {

// ---- bf16 on the host (bits in uint16_t, round to nearest even) ------------------------------

constexpr uint16_t kBf16NaN = 0x7FC0;

inline uint16_t FloatToBf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu) != 0) return kBf16NaN;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float Bf16BitsToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float RoundToBf16(float f) { return Bf16BitsToFloat(FloatToBf16Bits(f)); }

inline std::vector<uint16_t> ToBf16Bits(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToBf16Bits(v[i]);
  return out;
}

inline std::vector<float> FromBf16Bits(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16BitsToFloat(v[i]);
  return out;
}

// ---- Random data (always exactly representable in bf16) ---------------------------------------

// Uniform in [lo, hi), rounded to bf16. Draws one seed from `rng`, then runs a splitmix64 stream
// (mt19937_64 through uniform_real_distribution dominates large test setups).
inline void FillRandomBf16(float* v, size_t n, float lo, float hi, std::mt19937_64& rng) {
  uint64_t state = rng();
  const float span = hi - lo;
  for (size_t i = 0; i < n; ++i) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
    v[i] = RoundToBf16(lo + span * u);
  }
}

inline std::vector<float> RandomBf16Vector(size_t n, float lo, float hi, std::mt19937_64& rng) {
  std::vector<float> v(n);
  FillRandomBf16(v.data(), n, lo, hi, rng);
  return v;
}

// ---- Device memory ----------------------------------------------------------------------------

// An owning device array of T. Errors are reported through the returned cudaError_t.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(ptr_); }

  cudaError_t Allocate(size_t n) {
    cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = n;
    return cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<size_t>(n, 1) * sizeof(T));
  }
  cudaError_t Upload(const std::vector<T>& host) {
    cudaError_t e = Allocate(host.size());
    if (e != cudaSuccess || host.empty()) return e;
    return cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  // Fills every byte with `byte` (0xFF in a bf16 array reads as NaN).
  cudaError_t Fill(int byte) { return cudaMemset(ptr_, byte, std::max<size_t>(size_, 1) * sizeof(T)); }
  cudaError_t Download(std::vector<T>* host) const {
    host->resize(size_);
    if (size_ == 0) return cudaSuccess;
    return cudaMemcpy(host->data(), ptr_, size_ * sizeof(T), cudaMemcpyDeviceToHost);
  }

  T* get() const { return ptr_; }
  size_t size() const { return size_; }

 private:
  T* ptr_ = nullptr;
  size_t size_ = 0;
};

// ---- Paged pools --------------------------------------------------------------------------------

// Host image of one paged pool (K or V of one cache kind): num_pages pages of
// [num_layers][num_kv_heads][page_rows][dim] bf16, the layout kernels/paged_kv.h describes.
// Starts as NaN everywhere, so a kernel that reads a row nobody wrote produces NaN.
struct HostPagedPool {
  HostPagedPool(int num_pages, int num_layers, int num_kv_heads, int page_rows, int dim)
      : num_pages(num_pages), num_layers(num_layers), num_kv_heads(num_kv_heads), page_rows(page_rows), dim(dim),
        data(static_cast<size_t>(num_pages) * PageStride(), kBf16NaN) {}

  int64_t PageStride() const { return static_cast<int64_t>(num_layers) * num_kv_heads * page_rows * dim; }
  int64_t LayerOffset(int layer) const { return static_cast<int64_t>(layer) * num_kv_heads * page_rows * dim; }
  uint16_t* Row(int32_t page, int layer, int head, int row) {
    return data.data() + page * PageStride() + LayerOffset(layer) +
           (static_cast<int64_t>(head) * page_rows + row) * dim;
  }

  int num_pages, num_layers, num_kv_heads, page_rows, dim;
  std::vector<uint16_t> data;
};

// Writes logical rows [first, first + count) of one (layer, KV head): row i is read from
// src + (i - first) * src_stride (dim floats, already bf16-exact) and stored in physical page
// table[(i / page_rows) % ring_pages] (ring_pages > 0) or table[i / page_rows].
inline void ScatterRows(const float* src, int64_t src_stride, int64_t first, int64_t count, const int32_t* table,
                        int ring_pages, int layer, int head, HostPagedPool* pool) {
  for (int64_t i = first; i < first + count; ++i) {
    int64_t logical = i / pool->page_rows;
    if (ring_pages > 0) logical %= ring_pages;
    uint16_t* dst = pool->Row(table[logical], layer, head, static_cast<int>(i % pool->page_rows));
    const float* s = src + (i - first) * src_stride;
    for (int c = 0; c < pool->dim; ++c) dst[c] = FloatToBf16Bits(s[c]);
  }
}

// Hands out distinct physical page ids of a pool of num_pages pages in a seeded random order.
class PageAllocator {
 public:
  PageAllocator(int num_pages, std::mt19937_64& rng) : free_(num_pages) {
    std::iota(free_.begin(), free_.end(), 0);
    std::shuffle(free_.begin(), free_.end(), rng);
  }
  // `n` pages; an empty vector (and a test failure by the caller) when the pool is exhausted.
  std::vector<int32_t> Take(int n) {
    if (n > static_cast<int>(free_.size())) return {};
    std::vector<int32_t> out(free_.end() - n, free_.end());
    free_.resize(free_.size() - n);
    return out;
  }

 private:
  std::vector<int32_t> free_;
};

// A paged K/V cache on the device (two-layer pools; the view points at layer kPagedLayer so the
// layer offset is exercised) and the kernels' view of it.
constexpr int kPagedLayers = 2;
constexpr int kPagedLayer = 1;

struct DevicePagedCache {
  DeviceArray<uint16_t> k, v;
  DeviceArray<int32_t> table;
  kernels::PagedKvCache view;
};

// Builds a paged cache for n = k_src.size() sequences: rows [0, written[s]) of sequence s and KV
// head h, read from k_src[s] + h * src_rows[s] * dk (and v_src likewise, dv columns), go to
// randomly permuted physical pages; ring_pages > 0 makes each sequence's cache a ring of that many
// pages, written in row order (later rows overwrite older ones). Everything not written, including
// the page that unused page-table entries point at, reads as NaN. Call it under
// ASSERT_NO_FATAL_FAILURE.
inline void BuildDevicePagedCache(const std::vector<const float*>& k_src, const std::vector<const float*>& v_src,
                                  const std::vector<int64_t>& src_rows, const std::vector<int64_t>& written, int hkv,
                                  int dk, int dv, int page_rows, int ring_pages, std::mt19937_64& rng,
                                  DevicePagedCache* out) {
  const size_t n = k_src.size();
  std::vector<int> pages(n);
  int total = 0, stride = 1;
  for (size_t s = 0; s < n; ++s) {
    pages[s] = ring_pages > 0 ? ring_pages : static_cast<int>((written[s] + page_rows - 1) / page_rows);
    total += pages[s];
    stride = std::max(stride, pages[s] + 1);
  }
  const int pool_pages = total + 2;  // one never-written poison page, one spare
  HostPagedPool kp(pool_pages, kPagedLayers, hkv, page_rows, dk), vp(pool_pages, kPagedLayers, hkv, page_rows, dv);
  PageAllocator alloc(pool_pages, rng);
  const int32_t poison = alloc.Take(1)[0];
  std::vector<int32_t> table(n * stride, poison);
  for (size_t s = 0; s < n; ++s) {
    std::vector<int32_t> got = alloc.Take(pages[s]);
    ASSERT_EQ(static_cast<int>(got.size()), pages[s]);
    std::copy(got.begin(), got.end(), table.begin() + s * stride);
    for (int h = 0; h < hkv; ++h) {
      ScatterRows(k_src[s] + h * src_rows[s] * dk, dk, 0, written[s], table.data() + s * stride, ring_pages,
                  kPagedLayer, h, &kp);
      ScatterRows(v_src[s] + h * src_rows[s] * dv, dv, 0, written[s], table.data() + s * stride, ring_pages,
                  kPagedLayer, h, &vp);
    }
  }
  NEEDLE_CUDA_ASSERT(out->k.Upload(kp.data));
  NEEDLE_CUDA_ASSERT(out->v.Upload(vp.data));
  NEEDLE_CUDA_ASSERT(out->table.Upload(table));
  kernels::PagedKvCache& c = out->view;
  c.k = reinterpret_cast<const __nv_bfloat16*>(out->k.get()) + kp.LayerOffset(kPagedLayer);
  c.v = reinterpret_cast<const __nv_bfloat16*>(out->v.get()) + vp.LayerOffset(kPagedLayer);
  c.k_page_stride = kp.PageStride();
  c.v_page_stride = vp.PageStride();
  c.page_table = out->table.get();
  c.table_stride = stride;
  c.page_rows = page_rows;
  c.ring_pages = ring_pages;
  c.num_pages = kp.num_pages;
}

// ---- Comparison ---------------------------------------------------------------------------------

// Every element must satisfy |a - e| <= atol + rtol * |e|, and no element of either may be NaN.
// The failure message starts with `what` (say: seed and case), then the number of bad elements,
// the first bad index, and the worst excess error with its index.
inline ::testing::AssertionResult AllClose(const float* actual, const float* expected, size_t n, float atol,
                                           float rtol, const std::string& what) {
  size_t bad = 0, first_bad = n, worst = n;
  double worst_excess = 0, worst_err = 0;
  for (size_t i = 0; i < n; ++i) {
    const double a = actual[i], e = expected[i];
    const double err = std::fabs(a - e);
    const double excess = (std::isnan(a) || std::isnan(e)) ? INFINITY : err - (atol + rtol * std::fabs(e));
    if (excess > 0) {
      ++bad;
      if (first_bad == n) first_bad = i;
      if (worst == n || excess > worst_excess) worst = i, worst_excess = excess, worst_err = err;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream msg;
  msg << what << ": " << bad << " of " << n << " elements outside atol " << atol << " + rtol " << rtol
      << "; first at index " << first_bad << " (got " << actual[first_bad] << ", want " << expected[first_bad]
      << "); worst at index " << worst << " (got " << actual[worst] << ", want " << expected[worst]
      << ", |err| " << worst_err << ")";
  return ::testing::AssertionFailure() << msg.str();
}

// Runs check(i) for i in [0, n) on all cores (reference checks of many tokens are slow on one);
// check returns an empty string when item i is right, else its failure message. After a failure no
// new items start; the result is the failure of the lowest failing item found ("" if none). check
// must be safe to call from several threads at once.
template <class Check>
std::string ParallelCheck(size_t n, Check check) {
  std::vector<std::string> failures(n);
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  auto worker = [&] {
    for (size_t i = next++; i < n && !failed; i = next++) {
      failures[i] = check(i);
      if (!failures[i].empty()) failed = true;
    }
  };
  const size_t workers = std::max<size_t>(1, std::min<size_t>(n, std::max(1u, std::thread::hardware_concurrency())));
  std::vector<std::thread> threads;
  for (size_t w = 0; w < workers; ++w) threads.emplace_back(worker);
  for (std::thread& t : threads) t.join();
  for (const std::string& f : failures) {
    if (!f.empty()) return f;
  }
  return "";
}

}  // namespace needle::gpu_test
