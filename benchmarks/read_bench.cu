// needle-read-bench: how fast can a kernel stream a paged K/V cache from HBM into shared memory, by
// copy mechanism, with no attention math? The ceiling the split-KV decode kernels are measured
// against (docs/perf-notes.md). Same layout and split as paged dense decode: `pairs` (sequence, KV
// head) each own `pages` random physical pages of 64 rows of K ([64][d] bf16, contiguous) and as
// many of V; one wave of CTAs, each pair's pages cut into equal runs; a CTA streams its run through
// `stages` shared-memory stages of one page of K and V each. Mechanisms:
//   cp.async  16-byte cp.async.cg (L2::256B), 128 threads, as splitkv::CopyChunk (padded rows)
//   tma       one cp.async.bulk.tensor.2d box per 64-column slab of K and of V (128-byte swizzle),
//             completion on an mbarrier per stage
//   bulk      one cp.async.bulk of a whole K page and one of V (unswizzled), mbarrier per stage
//   ld.v4     plain 16-byte loads into registers, a page's loads of a thread all in flight (no shared memory)
// Prints a table (GB/s read, % of the device-to-device copy bandwidth) and writes JSON. A measuring
// tool, never a test. sm_90 only (TMA, bulk copies).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "benchmarks/bench_fill.h"
#include "kernels/split_kv_attention.cuh"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::vector<std::string>, dims, std::vector<std::string>({"64", "128"}), "head dims (64, 128)");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"8", "64"}), "sequences (4 KV heads each)");
ABSL_FLAG(int64_t, context, 65536, "rows per (sequence, KV head)");
ABSL_FLAG(int, trials, 15, "timed launches per configuration (the median is reported)");
ABSL_FLAG(std::string, json, "", "write the results as JSON to this file");

namespace {

namespace dt = needle::kernels::detail;
namespace sk = needle::kernels::detail::splitkv;

constexpr int kRows = sk::kRows;
constexpr int kThreads = 128;
constexpr int kKvHeads = 4;

struct Work {
  const int32_t* table = nullptr;  // [pairs][pages] physical page ids
  int pages = 0;                   // logical pages per pair
  int runs = 0;                    // CTAs per pair
  unsigned long long* sink = nullptr;
};


__device__ __forceinline__ void RunOf(const Work& w, int* pair, int* first, int* count) {
  *pair = blockIdx.x / w.runs;
  const int run = blockIdx.x % w.runs, per = (w.pages + w.runs - 1) / w.runs;
  *first = run * per;
  *count = max(0, min(w.pages, *first + per) - *first);
}

// ---- cp.async -------------------------------------------------------------------------------------
template <int D, int kStages>
__global__ void __launch_bounds__(kThreads) CpAsyncRead(const __nv_bfloat16* k, const __nv_bfloat16* v, Work w) {
  extern __shared__ __align__(16) char smem[];
  constexpr int kStride = D + 8, kSegs = D / 8;
  constexpr size_t kStage = size_t{2} * kRows * kStride * 2;
  int pair, first, count;
  RunOf(w, &pair, &first, &count);
  const int32_t* table = w.table + static_cast<int64_t>(pair) * w.pages + first;
  uint32_t acc = 0;
  auto issue = [&](int c) {
    const int64_t page = table[c];
    const __nv_bfloat16* src[2] = {k + page * kRows * D, v + page * kRows * D};
    char* dst = smem + (c % kStages) * kStage;
#pragma unroll
    for (int kv = 0; kv < 2; ++kv) {
#pragma unroll
      for (int i = threadIdx.x; i < kRows * kSegs; i += kThreads) {
        const int row = i / kSegs, seg = i % kSegs;
        dt::CpAsync16(dst + (kv * kRows * kStride + row * kStride + seg * 8) * 2, src[kv] + row * D + seg * 8, true);
      }
    }
    dt::CpAsyncCommit();
  };
  for (int c = 0; c < kStages - 1; ++c) {
    if (c < count) {
      issue(c);
    } else {
      dt::CpAsyncCommit();
    }
  }
  for (int c = 0; c < count; ++c) {
    if (c + kStages - 1 < count) {
      issue(c + kStages - 1);
    } else {
      dt::CpAsyncCommit();
    }
    dt::CpAsyncWait<kStages - 1>();
    __syncthreads();
    acc ^= reinterpret_cast<const uint32_t*>(smem + (c % kStages) * kStage)[threadIdx.x * 4];
    __syncthreads();
  }
  if (acc == 0x9e3779b9u) atomicAdd(w.sink, 1ull);
}

// ---- TMA / bulk (mbarrier per stage) ---------------------------------------------------------------
template <int D, int kStages, bool kTensor>
__global__ void __launch_bounds__(kThreads) AsyncRead(const __grid_constant__ CUtensorMap kmap,
                                                     const __grid_constant__ CUtensorMap vmap,
                                                     const __nv_bfloat16* k, const __nv_bfloat16* v, Work w) {
  extern __shared__ __align__(16) char smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes: stages start on 1024-byte boundaries.
  char* smem = smem_raw + ((1024 - dt::SharedAddress(smem_raw) % 1024) % 1024);
  constexpr uint32_t kPageBytes = kRows * D * 2;
  constexpr size_t kStage = size_t{2} * kPageBytes;
  __shared__ uint64_t bars[kStages];
  int pair, first, count;
  RunOf(w, &pair, &first, &count);
  const int32_t* table = w.table + static_cast<int64_t>(pair) * w.pages + first;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) dt::MbarInit(&bars[s]);
  }
  __syncthreads();
  auto issue = [&](int c) {
    const int page = table[c];
    char* dst = smem + (c % kStages) * kStage;
    uint64_t* bar = &bars[c % kStages];
    dt::MbarArriveExpect(bar, 2 * kPageBytes);
    if constexpr (kTensor) {
#pragma unroll
      for (int kv = 0; kv < 2; ++kv) {
        const CUtensorMap* map = kv == 0 ? &kmap : &vmap;
#pragma unroll
        for (int slab = 0; slab < D / 64; ++slab) {
          dt::TmaLoad2d(dst + kv * kPageBytes + slab * kRows * 128, map, slab * 64, page * kRows, bar);
        }
      }
    } else {
      const int64_t offset = static_cast<int64_t>(page) * kRows * D;
      const __nv_bfloat16* src[2] = {k + offset, v + offset};
#pragma unroll
      for (int kv = 0; kv < 2; ++kv) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                dt::SharedAddress(dst + kv * kPageBytes)),
            "l"(src[kv]), "r"(kPageBytes), "r"(dt::SharedAddress(bar))
            : "memory");
#endif
      }
    }
  };
  if (threadIdx.x == 0) {
    for (int c = 0; c < kStages - 1 && c < count; ++c) issue(c);
  }
  uint32_t acc = 0;
  for (int c = 0; c < count; ++c) {
    if (threadIdx.x == 0 && c + kStages - 1 < count) issue(c + kStages - 1);
    dt::MbarWait(&bars[c % kStages], (c / kStages) & 1);
    acc ^= reinterpret_cast<const uint32_t*>(smem + (c % kStages) * kStage)[threadIdx.x * 4];
    __syncthreads();
  }
  if (acc == 0x9e3779b9u) atomicAdd(w.sink, 1ull);
}

// ---- plain loads -----------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(kThreads) LoadRead(const __nv_bfloat16* k, const __nv_bfloat16* v, Work w) {
  int pair, first, count;
  RunOf(w, &pair, &first, &count);
  const int32_t* table = w.table + static_cast<int64_t>(pair) * w.pages + first;
  constexpr int kVecs = kRows * D / 8;  // 16-byte vectors per page
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int c = 0; c < count; ++c) {
    const int64_t page = table[c];
    const uint4* ks = reinterpret_cast<const uint4*>(k + page * kRows * D);
    const uint4* vs = reinterpret_cast<const uint4*>(v + page * kRows * D);
    uint4 x[2 * kVecs / kThreads];
#pragma unroll
    for (int i = 0; i < kVecs / kThreads; ++i) {
      x[2 * i] = __ldcs(ks + threadIdx.x + i * kThreads);
      x[2 * i + 1] = __ldcs(vs + threadIdx.x + i * kThreads);
    }
#pragma unroll
    for (int i = 0; i < 2 * kVecs / kThreads; ++i) {
      acc.x ^= x[i].x;
      acc.y ^= x[i].y;
      acc.z ^= x[i].z;
      acc.w ^= x[i].w;
    }
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) atomicAdd(w.sink, 1ull);
}

// ---- host ------------------------------------------------------------------------------------------
CUtensorMap PoolMap(const void* base, int64_t rows, int d) {
  CUtensorMap map;
  if (!sk::EncodeRowBoxMap(base, rows, d, &map)) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed or is not available\n");
    std::exit(1);
  }
  return map;
}

template <class Kernel>
int CtasPerSm(Kernel kernel, size_t smem) {
  BENCH_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  BENCH_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  return per_sm;
}

struct Result {
  std::string mechanism;
  int d = 0, batch = 0, stages = 0, ctas_per_sm = 0;
  double median_us = 0, gbps = 0, pct_copy = 0;
};

template <int D>
void RunDim(int batch, int64_t context, int trials, double copy_gbps, std::vector<Result>* out) {
  const int pairs = batch * kKvHeads;
  const int pages = static_cast<int>(context / kRows);
  const int64_t total_pages = static_cast<int64_t>(pairs) * pages;
  const size_t pool_bytes = static_cast<size_t>(total_pages) * kRows * D * 2;
  __nv_bfloat16 *k = nullptr, *v = nullptr;
  BENCH_CHECK(cudaMalloc(&k, pool_bytes));
  BENCH_CHECK(cudaMalloc(&v, pool_bytes));
  BENCH_CHECK(cudaMemset(k, 0x3c, pool_bytes));
  BENCH_CHECK(cudaMemset(v, 0x3d, pool_bytes));
  std::vector<int32_t> table(total_pages);
  std::iota(table.begin(), table.end(), 0);
  std::mt19937 rng(1234 + D + batch);
  std::shuffle(table.begin(), table.end(), rng);
  int32_t* dtable = nullptr;
  unsigned long long* sink = nullptr;
  BENCH_CHECK(cudaMalloc(&dtable, table.size() * 4));
  BENCH_CHECK(cudaMalloc(&sink, 8));
  BENCH_CHECK(cudaMemcpy(dtable, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  const CUtensorMap kmap = PoolMap(k, total_pages * kRows, D);
  const CUtensorMap vmap = PoolMap(v, total_pages * kRows, D);
  int sms = 0;
  BENCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const double bytes = 2.0 * pool_bytes;

  auto time = [&](const std::string& name, int stages, int per_sm, auto launch) {
    Work w;
    w.table = dtable;
    w.pages = pages;
    w.sink = sink;
    const int wave = sms * std::max(per_sm, 1);
    w.runs = std::max(1, pairs < wave ? wave / pairs : 1);
    w.runs = std::min(w.runs, pages);
    const int grid = pairs * w.runs;
    cudaEvent_t e0, e1;
    BENCH_CHECK(cudaEventCreate(&e0));
    BENCH_CHECK(cudaEventCreate(&e1));
    launch(grid, w);
    BENCH_CHECK(cudaGetLastError());
    BENCH_CHECK(cudaDeviceSynchronize());
    std::vector<double> us;
    for (int t = 0; t < trials; ++t) {
      BENCH_CHECK(cudaEventRecord(e0));
      launch(grid, w);
      BENCH_CHECK(cudaEventRecord(e1));
      BENCH_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      BENCH_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      us.push_back(ms * 1e3);
    }
    BENCH_CHECK(cudaEventDestroy(e0));
    BENCH_CHECK(cudaEventDestroy(e1));
    std::sort(us.begin(), us.end());
    Result r;
    r.mechanism = name;
    r.d = D;
    r.batch = batch;
    r.stages = stages;
    r.ctas_per_sm = per_sm;
    r.median_us = us[us.size() / 2];
    r.gbps = bytes / (r.median_us * 1e-6) / 1e9;
    r.pct_copy = 100.0 * r.gbps / copy_gbps;
    out->push_back(r);
    std::printf("| %-8s | %3d | %3d | %d | %d | %9.1f | %6.0f | %5.1f%% |\n", name.c_str(), D, batch, stages, per_sm,
                r.median_us, r.gbps, r.pct_copy);
    std::fflush(stdout);
  };

  auto cp_async = [&](auto stages_tag) {
    constexpr int S = decltype(stages_tag)::value;
    const size_t smem = size_t{S} * 2 * kRows * (D + 8) * 2;
    auto kernel = CpAsyncRead<D, S>;
    time("cp.async", S, CtasPerSm(kernel, smem),
         [&](int grid, const Work& w) { kernel<<<grid, kThreads, smem>>>(k, v, w); });
  };
  auto async = [&](auto stages_tag, auto tensor_tag, const char* name) {
    constexpr int S = decltype(stages_tag)::value;
    constexpr bool T = decltype(tensor_tag)::value;
    const size_t smem = size_t{S} * 2 * kRows * D * 2 + 1024;
    auto kernel = AsyncRead<D, S, T>;
    time(name, S, CtasPerSm(kernel, smem), [&](int grid, const Work& w) {
      kernel<<<grid, kThreads, smem>>>(kmap, vmap, k, v, w);
    });
  };
  cp_async(std::integral_constant<int, 2>{});
  cp_async(std::integral_constant<int, 3>{});
  async(std::integral_constant<int, 2>{}, std::true_type{}, "tma");
  async(std::integral_constant<int, 4>{}, std::true_type{}, "tma");
  async(std::integral_constant<int, 2>{}, std::false_type{}, "bulk");
  async(std::integral_constant<int, 4>{}, std::false_type{}, "bulk");
  {
    auto kernel = LoadRead<D>;
    time("ld.v4", 1, CtasPerSm(kernel, 0), [&](int grid, const Work& w) { kernel<<<grid, kThreads>>>(k, v, w); });
  }
  BENCH_CHECK(cudaFree(k));
  BENCH_CHECK(cudaFree(v));
  BENCH_CHECK(cudaFree(dtable));
  BENCH_CHECK(cudaFree(sink));
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t context = absl::GetFlag(FLAGS_context);
  const int trials = absl::GetFlag(FLAGS_trials);
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  if (prop.major < 9) {
    std::fprintf(stderr, "needle-read-bench needs sm_90 (TMA); this device is sm_%d%d\n", prop.major, prop.minor);
    return 1;
  }
  double copy_gbps = 0;
  BENCH_CHECK(needle::bench::CopyBandwidthGBps(nullptr, &copy_gbps));
  std::printf("device: %s; device-to-device copy %.0f GB/s (read + write); context %lld rows, %d KV heads\n",
              prop.name, copy_gbps, static_cast<long long>(context), kKvHeads);
  std::printf("| mechanism | d | batch | stages | CTAs/SM | median us | GB/s | %% copy |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
  std::vector<Result> results;
  for (const std::string& b : absl::GetFlag(FLAGS_batches)) {
    for (const std::string& d : absl::GetFlag(FLAGS_dims)) {
      const int batch = std::stoi(b);
      if (d == "64") {
        RunDim<64>(batch, context, trials, copy_gbps, &results);
      } else if (d == "128") {
        RunDim<128>(batch, context, trials, copy_gbps, &results);
      } else {
        std::fprintf(stderr, "unsupported head dim %s (64, 128)\n", d.c_str());
        return 1;
      }
    }
  }
  const std::string json_path = absl::GetFlag(FLAGS_json);
  if (!json_path.empty()) {
    nlohmann::json j;
    j["device"] = prop.name;
    j["copy_gbps"] = copy_gbps;
    j["context"] = context;
    for (const Result& r : results) {
      j["results"].push_back({{"mechanism", r.mechanism}, {"d", r.d}, {"batch", r.batch}, {"stages", r.stages},
                              {"ctas_per_sm", r.ctas_per_sm}, {"median_us", r.median_us}, {"gbps", r.gbps},
                              {"pct_copy", r.pct_copy}});
    }
    std::ofstream(json_path) << j.dump(2) << "\n";
  }
  return 0;
}
