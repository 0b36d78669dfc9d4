// needle-kernel-bench: times one decode step of one layer's attention, NSA (kernels/nsa_decode.h)
// against dense (kernels/dense_attention.h), both on their split-KV paths, at the paper geometry
// (4 KV heads x 16 query heads, d_k 192, d_v 128, l 32, d 16, l' 64, n 16, w 512, independent
// branch K/V) and the FLA geometry (4 x 16, d 64, l = d = l' = 64, n 16, w 512, shared K/V), over
// contexts and batch sizes. Every sequence of a batch decodes at position context - 1.
//
// Per configuration: the median time per call from CUDA events around CUDA graphs of many calls,
// with the inputs rotated over enough copies of the caches that the bytes of consecutive calls do not
// sit in L2; the bytes the step must read (NSA: N_c compressed + n l' selected + w window tokens of K
// and V per KV head; dense: every token); the achieved bandwidth; that as a percentage of the
// device-to-device copy bandwidth measured in the same run; dense time / NSA time. Prints a table and
// writes JSON (--json). A measuring tool, never a test: it checks launch errors, not results.
//
// --prefill: instead, dense prefill of one sequence's chunk (--prefill_chunk tokens, default 2048)
// starting at each of --prefill_contexts (default 0, 16k, 56k), paper geometry (64 query / 4 KV
// heads, d_k 192, d_v 128) and llama8 (32 / 8, d 128): the tensor-core prefill path against the
// simple kernel (DenseAttentionParams::simple_prefill) on the same input, and the prefill path with P
// rounded to bf16 once (prefill_p_bf16); median time of CUDA-event timed launches, TFLOP/s
// (2 (d_k + d_v) flops per (query head, attended key)), and the simple / prefill ratio.
//
// --nsa_prefill: instead, NSA prefill (kernels/nsa_prefill.h) of one sequence's chunk at the paper
// geometry (64 query / 4 KV heads, d_k 192, d_v 128, l 32, d 16, l' 64, n 16, w 512, independent
// branch K/V: the chunk's window rows from the chunk buffers, earlier ones from the ring) at the
// same chunk sizes and positions: the tensor-core path against the simple kernel
// (NsaPrefillParams::simple) on the same input, and dense prefill of the same shape as a reference;
// median time of CUDA-event timed launches and the ratios.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "benchmarks/bench_fill.h"
#include "kernels/dense_attention.h"
#include "kernels/nsa_decode.h"
#include "kernels/nsa_prefill.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, json, "", "write the results as JSON to this file");
ABSL_FLAG(std::vector<std::string>, geometries, std::vector<std::string>({"paper", "fla"}), "paper and/or fla");
ABSL_FLAG(std::vector<std::string>, contexts,
          std::vector<std::string>({"8192", "16384", "32768", "65536", "131072"}), "context lengths");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"1", "8", "32", "64"}), "batch sizes");
ABSL_FLAG(int, page_rows, 64, "tokens per KV cache page (each K or V page of a KV head is page_rows contiguous rows)");
ABSL_FLAG(int, trials, 15, "timed graph launches per configuration and path (the median is reported)");
ABSL_FLAG(double, graph_ms, 4.0, "about how long one timed graph of calls runs");
ABSL_FLAG(int64_t, rotation_mb, 256, "distinct bytes the calls of a graph read before repeating (L2: 50 MB)");
ABSL_FLAG(double, memory_gb, 0.0, "device memory the caches may use (0: free memory minus 6 GB)");
ABSL_FLAG(bool, single_kernel, false, "also time the single-kernel paths (no workspace) at 64k, batch 1 and 8");
ABSL_FLAG(bool, prefill, false, "time dense prefill chunks (tensor-core path vs simple kernel) instead of decode");
ABSL_FLAG(int, prefill_chunk, 2048, "--prefill: tokens per chunk");
ABSL_FLAG(std::vector<std::string>, prefill_contexts, std::vector<std::string>({"0", "16384", "57344"}),
          "--prefill: position of the chunk's first token");
ABSL_FLAG(bool, nsa_prefill, false,
          "time NSA prefill chunks (paper geometry; tensor-core path vs simple kernel vs dense prefill)");
ABSL_FLAG(bool, cp_async, false,
          "the split-KV decode kernels (NSA and dense) copy every chunk with 16-byte cp.async, no tensor-map boxes "
          "(A/B runs)");
ABSL_FLAG(int, chunks_per_split, 0,
          "split-KV decode: 64-row chunks per thread block, NSA and dense (0: the launchers' own choice; tuning)");
ABSL_FLAG(bool, profile, false, "launch each configuration's kernels once, untimed (for ncu), and exit");

namespace needle::bench {
namespace {

using kernels::NsaKernelGeometry;
using kernels::PagedKvCache;

int PageRows() { return absl::GetFlag(FLAGS_page_rows); }

struct Geometry {
  std::string name;
  int dk, dv, kv_heads, group;
  NsaKernelGeometry nsa;
  bool shared_kv;
};

const Geometry kPaper{"paper", 192, 128, 4, 16, {32, 16, 64, 16, 1, 2, 512}, false};
const Geometry kFla{"fla", 64, 64, 4, 16, {64, 64, 64, 16, 1, 2, 512}, true};

int64_t NumCompressed(const NsaKernelGeometry& g, int64_t t) {
  return t + 1 < g.cmp_block ? 0 : (t + 1 - g.cmp_block) / g.cmp_stride + 1;
}

// Bytes one decode step must read at context `ctx` (query at ctx - 1).
int64_t NsaBytes(const Geometry& g, int64_t ctx, int batch) {
  const int64_t tokens = NumCompressed(g.nsa, ctx - 1) +
                         std::min<int64_t>(g.nsa.num_selected * g.nsa.sel_block, ctx) +
                         std::min<int64_t>(g.nsa.window, ctx);
  return tokens * (g.dk + g.dv) * 2 * g.kv_heads * batch;
}
int64_t DenseBytes(const Geometry& g, int64_t ctx, int batch) { return ctx * (g.dk + g.dv) * 2 * g.kv_heads * batch; }

// An owning device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) { BENCH_CHECK(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1))); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// One paged pool (K and V of one cache kind, one layer) with its page table: `pages_per_seq` pages
// per sequence, physical pages in a seeded random order.
struct Pool {
  DeviceBuffer k, v, table;
  PagedKvCache view;
};

Pool MakePool(int batch, int kv_heads, int pages_per_seq, int ring_pages, int dk, int dv, float k_range,
              uint64_t seed, cudaStream_t stream) {
  Pool pool;
  const int64_t pages = static_cast<int64_t>(batch) * pages_per_seq;
  const int64_t k_page = static_cast<int64_t>(kv_heads) * PageRows() * dk, v_page = static_cast<int64_t>(kv_heads) * PageRows() * dv;
  pool.k = DeviceBuffer(pages * k_page * 2);
  pool.v = DeviceBuffer(pages * v_page * 2);
  BENCH_CHECK(FillUniformBf16(pool.k.get(), pages * k_page, -k_range, k_range, seed, stream));
  BENCH_CHECK(FillUniformBf16(pool.v.get(), pages * v_page, -1.0f, 1.0f, seed + 1, stream));
  std::vector<int32_t> table(pages);
  std::iota(table.begin(), table.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(table.begin(), table.end(), rng);
  pool.table = DeviceBuffer(table.size() * 4);
  BENCH_CHECK(cudaMemcpy(pool.table.get(), table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  PagedKvCache& c = pool.view;
  c.k = static_cast<const __nv_bfloat16*>(pool.k.get());
  c.v = static_cast<const __nv_bfloat16*>(pool.v.get());
  c.k_page_stride = k_page;
  c.v_page_stride = v_page;
  c.page_table = static_cast<const int32_t*>(pool.table.get());
  c.table_stride = pages_per_seq;
  c.page_rows = PageRows();
  c.ring_pages = ring_pages;
  c.num_pages = static_cast<int32_t>(pages);
  return pool;
}

// One copy of everything a step reads: caches, queries, gates.
struct Copy {
  Pool selection, compressed, window;
  DeviceBuffer q, gates;
};

int PagesFor(int64_t rows) { return static_cast<int>((rows + PageRows() - 1) / PageRows()); }
int RingPages(const Geometry& g) { return PagesFor(g.nsa.window) + 1; }

int64_t CopyBytes(const Geometry& g, int64_t ctx, int batch) {
  const int64_t row = static_cast<int64_t>(g.dk + g.dv) * 2 * g.kv_heads * PageRows();
  int64_t pages = PagesFor(ctx) + PagesFor(NumCompressed(g.nsa, ctx - 1));
  if (!g.shared_kv) pages += RingPages(g);
  const int64_t heads = static_cast<int64_t>(g.kv_heads) * g.group;
  return pages * row * batch + heads * batch * (g.dk + 3) * 2;
}

Copy MakeCopy(const Geometry& g, int64_t ctx, int batch, uint64_t seed, cudaStream_t stream) {
  Copy c;
  c.selection = MakePool(batch, g.kv_heads, PagesFor(ctx), 0, g.dk, g.dv, 2.0f, seed, stream);
  c.compressed = MakePool(batch, g.kv_heads, std::max(1, PagesFor(NumCompressed(g.nsa, ctx - 1))), 0, g.dk, g.dv, 3.0f,
                          seed + 10, stream);
  if (!g.shared_kv) {
    c.window = MakePool(batch, g.kv_heads, RingPages(g), RingPages(g), g.dk, g.dv, 2.0f, seed + 20, stream);
  }
  const int64_t heads = static_cast<int64_t>(g.kv_heads) * g.group * batch;
  c.q = DeviceBuffer(heads * g.dk * 2);
  c.gates = DeviceBuffer(heads * 3 * 2);
  BENCH_CHECK(FillUniformBf16(c.q.get(), heads * g.dk, -2.0f, 2.0f, seed + 30, stream));
  BENCH_CHECK(FillUniformBf16(c.gates.get(), heads * 3, 0.05f, 0.95f, seed + 40, stream));
  return c;
}

struct Timing {
  double median_us = 0, min_us = 0, max_us = 0;
  int calls_per_graph = 0;
  int trials = 0;
};

// Times launch(i) for call i, rotating over `copies` inputs: a warm-up, an estimate, then CUDA graphs
// of enough calls to run about graph_ms (at least one per copy), each graph launch timed with events.
Timing TimeCalls(const std::function<cudaError_t(int)>& launch, int copies, int trials, cudaStream_t stream) {
  for (int i = 0; i < std::min(copies, 3); ++i) BENCH_CHECK(launch(i));
  BENCH_CHECK(cudaStreamSynchronize(stream));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  const int probe = std::min(copies, 4);
  BENCH_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < probe; ++i) BENCH_CHECK(launch(i));
  BENCH_CHECK(cudaEventRecord(stop, stream));
  BENCH_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
  const double estimate_ms = std::max(1e-4, static_cast<double>(ms) / probe);
  Timing timing;
  timing.calls_per_graph =
      std::max(copies, std::min(4000, static_cast<int>(std::ceil(absl::GetFlag(FLAGS_graph_ms) / estimate_ms))));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  BENCH_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
  for (int i = 0; i < timing.calls_per_graph; ++i) BENCH_CHECK(launch(i % copies));
  BENCH_CHECK(cudaStreamEndCapture(stream, &graph));
  BENCH_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  BENCH_CHECK(cudaGraphLaunch(exec, stream));
  BENCH_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> per_call;
  for (int t = 0; t < trials; ++t) {
    BENCH_CHECK(cudaEventRecord(start, stream));
    BENCH_CHECK(cudaGraphLaunch(exec, stream));
    BENCH_CHECK(cudaEventRecord(stop, stream));
    BENCH_CHECK(cudaEventSynchronize(stop));
    BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
    per_call.push_back(1000.0 * ms / timing.calls_per_graph);
  }
  BENCH_CHECK(cudaGraphExecDestroy(exec));
  BENCH_CHECK(cudaGraphDestroy(graph));
  BENCH_CHECK(cudaEventDestroy(start));
  BENCH_CHECK(cudaEventDestroy(stop));
  std::sort(per_call.begin(), per_call.end());
  timing.median_us = per_call[per_call.size() / 2];
  timing.min_us = per_call.front();
  timing.max_us = per_call.back();
  timing.trials = trials;
  return timing;
}

// The launch parameters of one configuration over its copies, and the workspaces.
struct Config {
  Geometry g;
  int64_t ctx = 0;
  int batch = 0;
  std::vector<Copy> copies;
  DeviceBuffer positions, out, nsa_workspace, dense_workspace;
  std::vector<kernels::NsaDecodeParams> nsa;
  std::vector<kernels::DenseAttentionParams> dense;
};

void Build(Config* c, int num_copies, cudaStream_t stream) {
  const Geometry& g = c->g;
  const int H = g.kv_heads * g.group;
  for (int i = 0; i < num_copies; ++i) c->copies.push_back(MakeCopy(g, c->ctx, c->batch, 1000 + 97 * i, stream));
  std::vector<int32_t> positions(c->batch, static_cast<int32_t>(c->ctx - 1));
  c->positions = DeviceBuffer(positions.size() * 4);
  BENCH_CHECK(cudaMemcpy(c->positions.get(), positions.data(), positions.size() * 4, cudaMemcpyHostToDevice));
  c->out = DeviceBuffer(static_cast<size_t>(c->batch) * H * g.dv * 2);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(g.dk)));
  for (const Copy& copy : c->copies) {
    kernels::NsaDecodeParams p;
    p.q = static_cast<const __nv_bfloat16*>(copy.q.get());
    p.gates = copy.gates.get();
    p.gate_dtype = kernels::GateDType::kBf16;
    p.out = static_cast<__nv_bfloat16*>(c->out.get());
    p.positions = static_cast<const int32_t*>(c->positions.get());
    p.num_seqs = c->batch;
    p.num_heads = H;
    p.num_kv_heads = g.kv_heads;
    p.head_dim_qk = g.dk;
    p.head_dim_v = g.dv;
    p.max_context = static_cast<int>(c->ctx);
    p.softmax_scale = scale;
    p.geometry = g.nsa;
    p.compressed = copy.compressed.view;
    p.selection = copy.selection.view;
    p.window = g.shared_kv ? copy.selection.view : copy.window.view;
    p.shared_kv = g.shared_kv;
    p.cp_async_copies = absl::GetFlag(FLAGS_cp_async);
    p.chunks_per_split = absl::GetFlag(FLAGS_chunks_per_split);
    c->nsa.push_back(p);
    kernels::DenseAttentionParams d;
    d.q = p.q;
    d.out = p.out;
    d.start_pos = p.positions;
    d.num_seqs = c->batch;
    d.num_tokens = c->batch;
    d.num_heads = H;
    d.num_kv_heads = g.kv_heads;
    d.head_dim_qk = g.dk;
    d.head_dim_v = g.dv;
    d.softmax_scale = scale;
    d.kv = copy.selection.view;
    d.max_context = static_cast<int>(c->ctx);
    d.cp_async_copies = absl::GetFlag(FLAGS_cp_async);
    d.chunks_per_split = absl::GetFlag(FLAGS_chunks_per_split);
    c->dense.push_back(d);
  }
  c->nsa_workspace = DeviceBuffer(kernels::NsaDecodeSplitKvWorkspaceBytes(c->nsa[0]));
  c->dense_workspace = DeviceBuffer(kernels::DenseAttentionSplitKvWorkspaceBytes(c->dense[0]));
  BENCH_CHECK(cudaStreamSynchronize(stream));
}

struct Options {
  double copy_gbps = 0;
  double memory_bytes = 0;
  int trials = 15;
};

// Copies needed so that one pass over them reads rotation_mb distinct bytes on the smaller path.
int CopiesFor(const Geometry& g, int64_t ctx, int batch, const Options& o) {
  const double rotation = absl::GetFlag(FLAGS_rotation_mb) * 1e6;
  int copies = static_cast<int>(std::ceil(rotation / NsaBytes(g, ctx, batch)));
  copies = std::clamp(copies, 1, 256);
  const int64_t per_copy = CopyBytes(g, ctx, batch);
  const int fit = static_cast<int>(o.memory_bytes / static_cast<double>(per_copy));
  return std::min(copies, fit);
}

nlohmann::json RunConfig(const Geometry& g, int64_t ctx, int batch, const Options& o, cudaStream_t stream) {
  const int copies = CopiesFor(g, ctx, batch, o);
  nlohmann::json r = {{"geometry", g.name}, {"context", ctx}, {"batch", batch}};
  if (copies < 1) {
    r["skipped"] = "does not fit the memory budget";
    std::printf("%-6s %7lld %5d  skipped: %.1f GB per cache copy does not fit\n", g.name.c_str(),
                static_cast<long long>(ctx), batch, CopyBytes(g, ctx, batch) / 1e9);
    return r;
  }
  Config c;
  c.g = g;
  c.ctx = ctx;
  c.batch = batch;
  Build(&c, copies, stream);
  auto nsa = [&](int i) {
    return kernels::LaunchNsaDecode(c.nsa[i], c.nsa_workspace.get(), c.nsa_workspace.bytes(), stream);
  };
  auto dense = [&](int i) {
    return kernels::LaunchDenseAttention(c.dense[i], c.dense_workspace.get(), c.dense_workspace.bytes(), stream);
  };
  if (absl::GetFlag(FLAGS_profile)) {
    BENCH_CHECK(nsa(0));
    BENCH_CHECK(dense(0));
    BENCH_CHECK(cudaStreamSynchronize(stream));
    return r;
  }
  const Timing tn = TimeCalls(nsa, copies, o.trials, stream);
  const Timing td = TimeCalls(dense, copies, o.trials, stream);
  const double nsa_bytes = static_cast<double>(NsaBytes(g, ctx, batch));
  const double dense_bytes = static_cast<double>(DenseBytes(g, ctx, batch));
  const double nsa_gbps = nsa_bytes / (tn.median_us * 1e-6) / 1e9;
  const double dense_gbps = dense_bytes / (td.median_us * 1e-6) / 1e9;
  const double rotated = static_cast<double>(copies) * NsaBytes(g, ctx, batch);
  r["copies"] = copies;
  r["rotated_nsa_bytes"] = rotated;
  r["nsa"] = {{"median_us", tn.median_us}, {"min_us", tn.min_us}, {"max_us", tn.max_us},
              {"bytes", nsa_bytes},        {"gbps", nsa_gbps},      {"pct_copy", 100 * nsa_gbps / o.copy_gbps},
              {"calls_per_graph", tn.calls_per_graph}, {"trials", tn.trials}};
  r["dense"] = {{"median_us", td.median_us}, {"min_us", td.min_us}, {"max_us", td.max_us},
                {"bytes", dense_bytes},      {"gbps", dense_gbps},    {"pct_copy", 100 * dense_gbps / o.copy_gbps},
                {"calls_per_graph", td.calls_per_graph}, {"trials", td.trials}};
  r["dense_over_nsa"] = td.median_us / tn.median_us;
  std::printf("%-6s %7lld %5d %9.1f %8.1f %7.0f %5.1f%% %10.1f %9.1f %7.0f %5.1f%% %8.2fx %6d\n", g.name.c_str(),
              static_cast<long long>(ctx), batch, tn.median_us, nsa_bytes / 1e6, nsa_gbps,
              100 * nsa_gbps / o.copy_gbps, td.median_us, dense_bytes / 1e6, dense_gbps,
              100 * dense_gbps / o.copy_gbps, td.median_us / tn.median_us, copies);
  std::fflush(stdout);
  return r;
}

// The single-kernel paths (no workspace: one thread block per sequence and KV head), for reference.
nlohmann::json RunSingleKernel(const Geometry& g, int64_t ctx, int batch, const Options& o, cudaStream_t stream) {
  // Milliseconds per call: L2 reuse is irrelevant, two copies and three trials are enough.
  const int copies = std::min(2, CopiesFor(g, ctx, batch, o));
  nlohmann::json r = {{"geometry", g.name}, {"context", ctx}, {"batch", batch}};
  if (copies < 1) return r;
  Config c;
  c.g = g;
  c.ctx = ctx;
  c.batch = batch;
  Build(&c, copies, stream);
  const Timing tn = TimeCalls([&](int i) { return kernels::LaunchNsaDecode(c.nsa[i], nullptr, stream); }, copies, 3, stream);
  const Timing td =
      TimeCalls([&](int i) { return kernels::LaunchDenseAttention(c.dense[i], nullptr, stream); }, copies, 3, stream);
  r["nsa_median_us"] = tn.median_us;
  r["dense_median_us"] = td.median_us;
  r["copies"] = copies;
  std::printf("single-kernel %-6s %7lld %5d  NSA %9.1f us (%5.1f%% of copy bw)  dense %10.1f us (%5.1f%%)\n",
              g.name.c_str(), static_cast<long long>(ctx), batch, tn.median_us,
              100 * NsaBytes(g, ctx, batch) / (tn.median_us * 1e3) / o.copy_gbps, td.median_us,
              100 * DenseBytes(g, ctx, batch) / (td.median_us * 1e3) / o.copy_gbps);
  std::fflush(stdout);
  return r;
}

// ---- Dense prefill ------------------------------------------------------------------------------

struct PrefillGeometry {
  std::string name;
  int heads, kv_heads, dk, dv;
};

// Median milliseconds of `reps` CUDA-event-timed launches (after `warmup` untimed ones).
double MedianMs(const std::function<cudaError_t()>& launch, int warmup, int reps, cudaStream_t stream) {
  for (int i = 0; i < warmup; ++i) BENCH_CHECK(launch());
  BENCH_CHECK(cudaStreamSynchronize(stream));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    BENCH_CHECK(cudaEventRecord(start, stream));
    BENCH_CHECK(launch());
    BENCH_CHECK(cudaEventRecord(stop, stream));
    BENCH_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    BENCH_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  BENCH_CHECK(cudaEventDestroy(start));
  BENCH_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

nlohmann::json RunPrefill(const PrefillGeometry& g, int64_t ctx, int chunk, cudaStream_t stream) {
  const int64_t rows = ctx + chunk;
  Pool pool = MakePool(1, g.kv_heads, PagesFor(rows), 0, g.dk, g.dv, 2.0f, 4242 + ctx, stream);
  DeviceBuffer q(static_cast<size_t>(chunk) * g.heads * g.dk * 2), out(static_cast<size_t>(chunk) * g.heads * g.dv * 2);
  BENCH_CHECK(FillUniformBf16(q.get(), static_cast<size_t>(chunk) * g.heads * g.dk, -2.0f, 2.0f, 77 + ctx, stream));
  const int32_t host_cu[2] = {0, chunk}, host_start[1] = {static_cast<int32_t>(ctx)};
  DeviceBuffer cu(sizeof(host_cu)), start(sizeof(host_start));
  BENCH_CHECK(cudaMemcpy(cu.get(), host_cu, sizeof(host_cu), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(start.get(), host_start, sizeof(host_start), cudaMemcpyHostToDevice));
  kernels::DenseAttentionParams p;
  p.q = static_cast<const __nv_bfloat16*>(q.get());
  p.out = static_cast<__nv_bfloat16*>(out.get());
  p.cu_tokens = static_cast<const int32_t*>(cu.get());
  p.start_pos = static_cast<const int32_t*>(start.get());
  p.num_seqs = 1;
  p.num_tokens = chunk;
  p.num_heads = g.heads;
  p.num_kv_heads = g.kv_heads;
  p.head_dim_qk = g.dk;
  p.head_dim_v = g.dv;
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(g.dk)));
  p.kv = pool.view;
  BENCH_CHECK(cudaStreamSynchronize(stream));
  const double fast_ms = MedianMs([&] { return kernels::LaunchDenseAttention(p, nullptr, stream); }, 2, 15, stream);
  kernels::DenseAttentionParams p_bf16 = p;
  p_bf16.prefill_p_bf16 = true;
  const double bf16_ms =
      MedianMs([&] { return kernels::LaunchDenseAttention(p_bf16, nullptr, stream); }, 2, 15, stream);
  kernels::DenseAttentionParams simple = p;
  simple.simple_prefill = true;
  auto launch_simple = [&] { return kernels::LaunchDenseAttention(simple, nullptr, stream); };
  // The simple kernel takes up to seconds: the first launch (also its warm-up) decides the repetitions,
  // and stands alone beyond a second.
  const double first_ms = MedianMs(launch_simple, 0, 1, stream);
  const int simple_reps = first_ms > 1000 ? 0 : first_ms > 200 ? 2 : 5;
  const double simple_ms = simple_reps == 0 ? first_ms : MedianMs(launch_simple, 0, simple_reps, stream);
  const double pairs = static_cast<double>(chunk) * ctx + 0.5 * chunk * (chunk + 1.0);  // (query, key) per head
  const double flops = 2.0 * (g.dk + g.dv) * pairs * g.heads;
  const double tflops = flops / (fast_ms * 1e-3) / 1e12, bf16_tflops = flops / (bf16_ms * 1e-3) / 1e12;
  std::printf("%-7s %3d/%-2d %3d/%-3d %7lld %6d %10.3f %8.1f %10.3f %8.1f %12.2f %8.1f %9.1fx\n", g.name.c_str(),
              g.heads, g.kv_heads, g.dk, g.dv, static_cast<long long>(ctx), chunk, fast_ms, tflops, bf16_ms,
              bf16_tflops, simple_ms, flops / (simple_ms * 1e-3) / 1e12, simple_ms / fast_ms);
  std::fflush(stdout);
  return {{"geometry", g.name}, {"heads", g.heads},   {"kv_heads", g.kv_heads},   {"dk", g.dk},
          {"dv", g.dv},         {"context", ctx},     {"chunk", chunk},           {"flops", flops},
          {"median_ms", fast_ms}, {"tflops", tflops}, {"p_bf16_median_ms", bf16_ms}, {"p_bf16_tflops", bf16_tflops},
          {"simple_median_ms", simple_ms},
          {"simple_over_fast", simple_ms / fast_ms}, {"simple_reps", simple_reps == 0 ? 1 : simple_reps}};
}

// ---- NSA prefill -------------------------------------------------------------------------------

nlohmann::json RunNsaPrefill(const Geometry& g, int64_t ctx, int chunk, cudaStream_t stream) {
  const int64_t rows = ctx + chunk;
  const int heads = g.kv_heads * g.group;
  const uint64_t seed = 5151 + ctx;
  Pool selection = MakePool(1, g.kv_heads, PagesFor(rows), 0, g.dk, g.dv, 2.0f, seed, stream);
  Pool compressed = MakePool(1, g.kv_heads, std::max(1, PagesFor(NumCompressed(g.nsa, rows - 1))), 0, g.dk, g.dv, 3.0f,
                             seed + 10, stream);
  Pool window;
  DeviceBuffer wk, wv;
  if (!g.shared_kv) {
    window = MakePool(1, g.kv_heads, RingPages(g), RingPages(g), g.dk, g.dv, 2.0f, seed + 20, stream);
    wk = DeviceBuffer(static_cast<size_t>(chunk) * g.kv_heads * g.dk * 2);
    wv = DeviceBuffer(static_cast<size_t>(chunk) * g.kv_heads * g.dv * 2);
    BENCH_CHECK(FillUniformBf16(wk.get(), static_cast<size_t>(chunk) * g.kv_heads * g.dk, -2.0f, 2.0f, seed + 21, stream));
    BENCH_CHECK(FillUniformBf16(wv.get(), static_cast<size_t>(chunk) * g.kv_heads * g.dv, -1.0f, 1.0f, seed + 22, stream));
  }
  DeviceBuffer q(static_cast<size_t>(chunk) * heads * g.dk * 2), out(static_cast<size_t>(chunk) * heads * g.dv * 2);
  DeviceBuffer gates(static_cast<size_t>(chunk) * heads * 3 * 2);
  DeviceBuffer sel(static_cast<size_t>(chunk) * g.kv_heads * g.nsa.num_selected * 4);
  BENCH_CHECK(FillUniformBf16(q.get(), static_cast<size_t>(chunk) * heads * g.dk, -2.0f, 2.0f, seed + 30, stream));
  BENCH_CHECK(FillUniformBf16(gates.get(), static_cast<size_t>(chunk) * heads * 3, 0.05f, 0.95f, seed + 40, stream));
  const int32_t host_cu[2] = {0, chunk}, host_start[1] = {static_cast<int32_t>(ctx)};
  DeviceBuffer cu(sizeof(host_cu)), start(sizeof(host_start));
  BENCH_CHECK(cudaMemcpy(cu.get(), host_cu, sizeof(host_cu), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(start.get(), host_start, sizeof(host_start), cudaMemcpyHostToDevice));
  kernels::NsaPrefillParams p;
  p.q = static_cast<const __nv_bfloat16*>(q.get());
  p.gates = gates.get();
  p.out = static_cast<__nv_bfloat16*>(out.get());
  p.selected_blocks = static_cast<int32_t*>(sel.get());
  p.cu_tokens = static_cast<const int32_t*>(cu.get());
  p.start_pos = static_cast<const int32_t*>(start.get());
  p.num_seqs = 1;
  p.num_tokens = chunk;
  p.num_heads = heads;
  p.num_kv_heads = g.kv_heads;
  p.head_dim_qk = g.dk;
  p.head_dim_v = g.dv;
  p.max_context = static_cast<int>(rows);
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(g.dk)));
  p.geometry = g.nsa;
  p.compressed = compressed.view;
  p.selection = selection.view;
  p.shared_kv = g.shared_kv;
  if (!g.shared_kv) {
    p.window = window.view;
    p.window_k_chunk = static_cast<const __nv_bfloat16*>(wk.get());
    p.window_v_chunk = static_cast<const __nv_bfloat16*>(wv.get());
  }
  BENCH_CHECK(cudaStreamSynchronize(stream));
  const double fast_ms = MedianMs([&] { return kernels::LaunchNsaPrefill(p, nullptr, stream); }, 2, 15, stream);
  kernels::NsaPrefillParams simple = p;
  simple.simple = true;
  auto launch_simple = [&] { return kernels::LaunchNsaPrefill(simple, nullptr, stream); };
  const double first_ms = MedianMs(launch_simple, 0, 1, stream);
  const int simple_reps = first_ms > 1000 ? 0 : first_ms > 200 ? 2 : 5;
  const double simple_ms = simple_reps == 0 ? first_ms : MedianMs(launch_simple, 0, simple_reps, stream);
  // Dense prefill of the same shape over the selection cache.
  kernels::DenseAttentionParams d;
  d.q = p.q;
  d.out = p.out;
  d.cu_tokens = p.cu_tokens;
  d.start_pos = p.start_pos;
  d.num_seqs = 1;
  d.num_tokens = chunk;
  d.num_heads = heads;
  d.num_kv_heads = g.kv_heads;
  d.head_dim_qk = g.dk;
  d.head_dim_v = g.dv;
  d.softmax_scale = p.softmax_scale;
  d.kv = selection.view;
  const double dense_ms = MedianMs([&] { return kernels::LaunchDenseAttention(d, nullptr, stream); }, 2, 15, stream);
  // Keys each (query token, KV head) attends, summed over the chunk: N_c(t) + selected rows + window.
  double keys = 0;
  for (int64_t t = ctx; t < rows; ++t) {
    const int64_t nb = t / g.nsa.sel_block + 1;
    keys += NumCompressed(g.nsa, t) + std::min<int64_t>(nb, g.nsa.num_selected) * g.nsa.sel_block -
            (g.nsa.sel_block - 1 - t % g.nsa.sel_block) + std::min<int64_t>(t + 1, g.nsa.window);
  }
  std::printf("%-6s %7lld %6d %10.3f %12.2f %10.3f %9.1fx %10.2fx %10.1f\n", g.name.c_str(), static_cast<long long>(ctx),
              chunk, fast_ms, simple_ms, dense_ms, simple_ms / fast_ms, dense_ms / fast_ms, keys / chunk);
  std::fflush(stdout);
  return {{"geometry", g.name},        {"context", ctx},          {"chunk", chunk},
          {"median_ms", fast_ms},      {"simple_median_ms", simple_ms}, {"dense_median_ms", dense_ms},
          {"simple_over_fast", simple_ms / fast_ms}, {"dense_over_fast", dense_ms / fast_ms},
          {"keys_per_query_group", keys / chunk},    {"simple_reps", simple_reps == 0 ? 1 : simple_reps}};
}

std::vector<int64_t> ParseInts(const std::vector<std::string>& items) {
  std::vector<int64_t> out;
  for (const std::string& s : items) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v < 1) {
      std::fprintf(stderr, "not a positive integer: %s\n", s.c_str());
      std::exit(2);
    }
    out.push_back(v);
  }
  return out;
}

int Main() {
  std::vector<Geometry> geometries;
  for (const std::string& name : absl::GetFlag(FLAGS_geometries)) {
    if (name == "paper") {
      geometries.push_back(kPaper);
    } else if (name == "fla") {
      geometries.push_back(kFla);
    } else {
      std::fprintf(stderr, "unknown geometry %s (paper, fla)\n", name.c_str());
      return 2;
    }
  }
  if (absl::GetFlag(FLAGS_prefill) || absl::GetFlag(FLAGS_nsa_prefill)) {
    std::vector<int64_t> prefill_contexts;
    for (const std::string& c : absl::GetFlag(FLAGS_prefill_contexts)) {
      int64_t v = -1;
      if (!absl::SimpleAtoi(c, &v) || v < 0) {
        std::fprintf(stderr, "not a context: %s\n", c.c_str());
        return 2;
      }
      prefill_contexts.push_back(v);
    }
    cudaDeviceProp prop;
    BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
    cudaStream_t stream;
    BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const int chunk = absl::GetFlag(FLAGS_prefill_chunk);
    const std::string json_path = absl::GetFlag(FLAGS_json);
    if (absl::GetFlag(FLAGS_nsa_prefill)) {
      std::printf("device: %s, %d SMs; NSA prefill of one %d-token chunk, batch 1, pages of %d rows\n", prop.name,
                  prop.multiProcessorCount, chunk, PageRows());
      std::printf("tc: the tensor-core path; simple: the one-block-per-(token, KV head) scalar kernel; dense: dense\n"
                  "prefill of the same shape; keys/q: keys each (token, KV head) attends (cmp + slc + win), mean\n");
      std::printf("%-6s %7s %6s %10s %12s %10s %10s %11s %10s\n", "geom", "context", "chunk", "tc ms", "simple ms",
                  "dense ms", "simple/tc", "dense/tc", "keys/q");
      nlohmann::json doc = {{"device", prop.name},
                            {"sms", prop.multiProcessorCount},
                            {"mode", "nsa_prefill"},
                            {"time_definition", "median of CUDA-event-timed launches (15 after 2 warm-up; simple: "
                                                "1 to 5)"},
                            {"nsa_prefill", nlohmann::json::array()}};
      for (const Geometry& g : geometries) {
        for (int64_t ctx : prefill_contexts) {
          doc["nsa_prefill"].push_back(RunNsaPrefill(g, ctx, chunk, stream));
          if (!json_path.empty()) std::ofstream(json_path) << doc.dump(2) << "\n";
        }
      }
      BENCH_CHECK(cudaStreamDestroy(stream));
      return 0;
    }
    std::printf("device: %s, %d SMs; dense prefill of one %d-token chunk, batch 1, pages of %d rows\n", prop.name,
                prop.multiProcessorCount, chunk, PageRows());
    std::printf("prefill: the tensor-core path (P as bf16 hi + lo); P bf16: the same with prefill_p_bf16; simple: the\n"
                "one-block-per-(token, KV head) kernel; speedup = simple / prefill\n");
    std::printf("%-7s %6s %7s %7s %6s %10s %8s %10s %8s %12s %8s %10s\n", "geom", "H/Hkv", "dk/dv", "context", "chunk",
                "prefill ms", "TFLOP/s", "P bf16 ms", "TFLOP/s", "simple ms", "TFLOP/s", "speedup");
    nlohmann::json doc = {{"device", prop.name},
                          {"sms", prop.multiProcessorCount},
                          {"mode", "prefill"},
                          {"time_definition", "median of CUDA-event-timed launches (prefill: 15 after 2 warm-up)"},
                          {"flops_definition", "2 (d_k + d_v) per (query head, attended key), causal"},
                          {"prefill", nlohmann::json::array()}};
    const PrefillGeometry kPrefillGeometries[] = {{"paper", 64, 4, 192, 128}, {"llama8", 32, 8, 128, 128}};
    for (const PrefillGeometry& g : kPrefillGeometries) {
      for (int64_t ctx : prefill_contexts) {
        doc["prefill"].push_back(RunPrefill(g, ctx, chunk, stream));
        if (!json_path.empty()) std::ofstream(json_path) << doc.dump(2) << "\n";
      }
    }
    BENCH_CHECK(cudaStreamDestroy(stream));
    return 0;
  }
  const std::vector<int64_t> contexts = ParseInts(absl::GetFlag(FLAGS_contexts));
  const std::vector<int64_t> batches = ParseInts(absl::GetFlag(FLAGS_batches));

  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Options o;
  o.trials = absl::GetFlag(FLAGS_trials);
  BENCH_CHECK(CopyBandwidthGBps(stream, &o.copy_gbps));
  size_t free_bytes = 0, total_bytes = 0;
  BENCH_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  o.memory_bytes = absl::GetFlag(FLAGS_memory_gb) > 0 ? absl::GetFlag(FLAGS_memory_gb) * 1e9
                                                      : static_cast<double>(free_bytes) - 6e9;
  std::printf("device: %s, %d SMs, L2 %.0f MB; device-to-device copy %.0f GB/s (read + write); cache budget %.1f GB\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize / 1e6, o.copy_gbps, o.memory_bytes / 1e9);
  std::printf("times per call = one layer's decode attention, median of %d CUDA-graph launches\n", o.trials);
  std::printf("%-6s %7s %5s %9s %8s %7s %6s %10s %9s %7s %6s %9s %6s\n", "geom", "context", "batch", "NSA us",
              "NSA MB", "GB/s", "%copy", "dense us", "dense MB", "GB/s", "%copy", "dense/NSA", "copies");

  nlohmann::json doc = {{"device", prop.name},
                        {"sms", prop.multiProcessorCount},
                        {"l2_bytes", prop.l2CacheSize},
                        {"copy_gbps", o.copy_gbps},
                        {"copy_gbps_definition", "2 * bytes / time of a 1 GiB cudaMemcpy device-to-device"},
                        {"time_definition", "median per call over CUDA-graph launches of many calls, inputs rotated"},
                        {"configs", nlohmann::json::array()},
                        {"single_kernel", nlohmann::json::array()}};
  const std::string json_path = absl::GetFlag(FLAGS_json);
  auto save = [&] {  // after every configuration, so that an interrupted run keeps what it measured
    if (!json_path.empty()) std::ofstream(json_path) << doc.dump(2) << "\n";
  };
  for (const Geometry& g : geometries) {
    for (int64_t ctx : contexts) {
      for (int64_t batch : batches) {
        doc["configs"].push_back(RunConfig(g, ctx, static_cast<int>(batch), o, stream));
        save();
      }
    }
  }
  if (absl::GetFlag(FLAGS_single_kernel) && !absl::GetFlag(FLAGS_profile)) {
    for (const Geometry& g : geometries) {
      for (int batch : {1, 8}) {
        doc["single_kernel"].push_back(RunSingleKernel(g, 65536, batch, o, stream));
        save();
      }
    }
  }
  BENCH_CHECK(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace
}  // namespace needle::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return needle::bench::Main();
}
