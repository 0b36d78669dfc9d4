// GPU op kernels (embedding, RMSNorm, RoPE, SwiGLU, gates, GEMM, KV append, compression) against the
// naive CPU references of kernels/reference on random bf16-exact inputs. Paged cases scatter the
// reference's contiguous rows into randomly permuted pages; pools start as NaN so that a kernel
// reading or writing the wrong row shows up. Label `gpu`: skipped without a GPU unless
// NEEDLE_REQUIRE_GPU=1.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/compress.h"
#include "kernels/embedding.h"
#include "kernels/gates.h"
#include "kernels/gemm.h"
#include "kernels/kv_append.h"
#include "kernels/reference/ops_ref.h"
#include "kernels/rms_norm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "tests/gpu/gpu_test_util.h"

namespace needle::kernels {
namespace {

namespace ref = reference;
using gpu_test::AllClose;
using gpu_test::Bf16BitsToFloat;
using gpu_test::DeviceArray;
using gpu_test::FromBf16Bits;
using gpu_test::HostPagedPool;
using gpu_test::PageAllocator;
using gpu_test::RandomBf16Vector;
using gpu_test::ToBf16Bits;

constexpr float kAtol = 1e-2f;
constexpr float kRtol = 1e-2f;

__nv_bfloat16* Bf(const DeviceArray<uint16_t>& a) { return reinterpret_cast<__nv_bfloat16*>(a.get()); }

std::string Case(uint64_t seed, const std::string& what) {
  std::ostringstream s;
  s << "seed " << seed << ", " << what;
  return s.str();
}

// A paged pool image compared after a kernel ran: rows the test expects written must match within
// tolerance; every other element must still hold the bits it started with.
::testing::AssertionResult PoolMatches(const std::vector<uint16_t>& actual, const std::vector<uint16_t>& initial,
                                       const std::vector<float>& expected, const std::vector<char>& written,
                                       float atol, float rtol, const std::string& what) {
  std::vector<float> got, want;
  for (size_t i = 0; i < actual.size(); ++i) {
    if (!written[i]) {
      if (actual[i] != initial[i]) {
        return ::testing::AssertionFailure() << what << ": element " << i << " was not to be written (bits 0x"
                                             << std::hex << initial[i] << ", now 0x" << actual[i] << ")";
      }
      continue;
    }
    got.push_back(Bf16BitsToFloat(actual[i]));
    want.push_back(expected[i]);
  }
  return AllClose(got.data(), want.data(), got.size(), atol, rtol, what + " (written elements, in pool order)");
}

TEST(EmbeddingGpu, GathersRowsAndZeroesInvalidIds) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const uint64_t seed = 11;
  std::mt19937_64 rng(seed);
  const int vocab = 300, hidden = 72, T = 37, out_stride = 80;
  const std::vector<float> table = RandomBf16Vector(static_cast<size_t>(vocab) * hidden, -1, 1, rng);
  std::vector<int32_t> ids(T);
  std::uniform_int_distribution<int> pick(0, vocab - 1);
  for (int32_t& id : ids) id = pick(rng);
  ids[3] = -1;
  ids[9] = vocab;
  DeviceArray<uint16_t> d_table, d_out;
  DeviceArray<int32_t> d_ids;
  NEEDLE_CUDA_ASSERT(d_table.Upload(ToBf16Bits(table)));
  NEEDLE_CUDA_ASSERT(d_ids.Upload(ids));
  NEEDLE_CUDA_ASSERT(d_out.Allocate(static_cast<size_t>(T) * out_stride));
  NEEDLE_CUDA_ASSERT(d_out.Fill(0xFF));
  EmbeddingParams p;
  p.num_tokens = T;
  p.vocab = vocab;
  p.hidden = hidden;
  p.token_ids = d_ids.get();
  p.table = Bf(d_table);
  p.out = Bf(d_out);
  p.out_stride = out_stride;
  NEEDLE_CUDA_ASSERT(LaunchEmbedding(p, nullptr));
  NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<uint16_t> out;
  NEEDLE_CUDA_ASSERT(d_out.Download(&out));
  std::vector<float> got, want;
  for (int t = 0; t < T; ++t) {
    for (int c = 0; c < hidden; ++c) {
      got.push_back(Bf16BitsToFloat(out[static_cast<size_t>(t) * out_stride + c]));
      const bool valid = ids[t] >= 0 && ids[t] < vocab;
      want.push_back(valid ? table[static_cast<size_t>(ids[t]) * hidden + c] : 0.0f);
    }
    for (int c = hidden; c < out_stride; ++c) {
      ASSERT_EQ(out[static_cast<size_t>(t) * out_stride + c], 0xFFFF) << "padding column written, token " << t;
    }
  }
  EXPECT_TRUE(AllClose(got.data(), want.data(), got.size(), 0, 0, Case(seed, "embedding")));
}

TEST(RmsNormGpu, MatchesReferenceWithGatherAndInPlace) {
  NEEDLE_SKIP_WITHOUT_GPU();
  for (int hidden : {64, 1000, 2560}) {
    const uint64_t seed = 100 + hidden;
    std::mt19937_64 rng(seed);
    const int rows = 9, stride = hidden + 8;
    const float eps = 1e-6f;
    const std::vector<float> x = RandomBf16Vector(static_cast<size_t>(rows) * stride, -2, 2, rng);
    const std::vector<float> w = RandomBf16Vector(hidden, 0.5f, 1.5f, rng);
    std::vector<float> want(static_cast<size_t>(rows) * hidden);
    for (int r = 0; r < rows; ++r) {
      ref::RmsNorm(x.data() + static_cast<size_t>(r) * stride, w.data(), hidden, eps, want.data() + r * hidden);
    }
    DeviceArray<uint16_t> d_x, d_w, d_y;
    DeviceArray<int32_t> d_idx;
    NEEDLE_CUDA_ASSERT(d_x.Upload(ToBf16Bits(x)));
    NEEDLE_CUDA_ASSERT(d_w.Upload(ToBf16Bits(w)));
    NEEDLE_CUDA_ASSERT(d_y.Allocate(static_cast<size_t>(rows) * hidden));
    RmsNormParams p;
    p.num_rows = rows;
    p.hidden = hidden;
    p.eps = eps;
    p.x = Bf(d_x);
    p.x_stride = stride;
    p.weight = Bf(d_w);
    p.y = Bf(d_y);
    p.y_stride = hidden;
    NEEDLE_CUDA_ASSERT(LaunchRmsNorm(p, nullptr));
    NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
    std::vector<uint16_t> y;
    NEEDLE_CUDA_ASSERT(d_y.Download(&y));
    std::vector<float> got = FromBf16Bits(y);
    EXPECT_TRUE(AllClose(got.data(), want.data(), got.size(), kAtol, kRtol,
                         Case(seed, "rmsnorm hidden " + std::to_string(hidden))));

    // Gather: rows 8, 0, 5.
    const std::vector<int32_t> idx = {8, 0, 5};
    NEEDLE_CUDA_ASSERT(d_idx.Upload(idx));
    p.num_rows = 3;
    p.row_index = d_idx.get();
    NEEDLE_CUDA_ASSERT(LaunchRmsNorm(p, nullptr));
    NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
    NEEDLE_CUDA_ASSERT(d_y.Download(&y));
    got = FromBf16Bits(y);
    std::vector<float> want_g;
    for (int32_t r : idx) want_g.insert(want_g.end(), want.begin() + r * hidden, want.begin() + (r + 1) * hidden);
    EXPECT_TRUE(AllClose(got.data(), want_g.data(), want_g.size(), kAtol, kRtol,
                         Case(seed, "rmsnorm gather hidden " + std::to_string(hidden))));

    // In place.
    p.num_rows = rows;
    p.row_index = nullptr;
    p.y = Bf(d_x);
    p.y_stride = stride;
    NEEDLE_CUDA_ASSERT(LaunchRmsNorm(p, nullptr));
    NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
    std::vector<uint16_t> xo;
    NEEDLE_CUDA_ASSERT(d_x.Download(&xo));
    got.clear();
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < hidden; ++c) got.push_back(Bf16BitsToFloat(xo[static_cast<size_t>(r) * stride + c]));
    }
    EXPECT_TRUE(AllClose(got.data(), want.data(), got.size(), kAtol, kRtol,
                         Case(seed, "rmsnorm in place hidden " + std::to_string(hidden))));
  }
}

TEST(RopeGpu, MatchesReferenceOnFusedQkvWithInt32AndInt64Positions) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const int T = 13, H = 4, Hkv = 2;
  for (int d : {16, 24, 64, 128, 192}) {
    for (double theta : {10000.0, 500000.0}) {
      for (bool int64 : {false, true}) {
        const uint64_t seed = 1000 + d + (int64 ? 1 : 0) + static_cast<uint64_t>(theta / 1000);
        std::mt19937_64 rng(seed);
        const int64_t stride = static_cast<int64_t>(H + 2 * Hkv) * d;  // q | k | v
        const std::vector<float> qkv = RandomBf16Vector(static_cast<size_t>(T) * stride, -2, 2, rng);
        std::vector<int64_t> pos64(T);
        std::uniform_int_distribution<int64_t> pick(0, 70000);
        for (int64_t& p : pos64) p = pick(rng);
        pos64[0] = 0;
        pos64[1] = 131071;
        std::vector<int32_t> pos32(pos64.begin(), pos64.end());
        std::vector<float> want = qkv;
        for (int t = 0; t < T; ++t) {
          for (int h = 0; h < H + Hkv; ++h) ref::ApplyRope(want.data() + t * stride + h * d, d, pos64[t], theta);
        }
        DeviceArray<uint16_t> d_qkv;
        DeviceArray<int64_t> d_p64;
        DeviceArray<int32_t> d_p32;
        NEEDLE_CUDA_ASSERT(d_qkv.Upload(ToBf16Bits(qkv)));
        NEEDLE_CUDA_ASSERT(d_p64.Upload(pos64));
        NEEDLE_CUDA_ASSERT(d_p32.Upload(pos32));
        RopeParams p;
        p.num_tokens = T;
        p.head_dim = d;
        p.theta = theta;
        p.q = Bf(d_qkv);
        p.q_stride = stride;
        p.num_q_heads = H;
        p.k = Bf(d_qkv) + static_cast<int64_t>(H) * d;
        p.k_stride = stride;
        p.num_k_heads = Hkv;
        p.positions = int64 ? static_cast<const void*>(d_p64.get()) : static_cast<const void*>(d_p32.get());
        p.positions_int64 = int64;
        NEEDLE_CUDA_ASSERT(LaunchRope(p, nullptr));
        NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
        std::vector<uint16_t> out;
        NEEDLE_CUDA_ASSERT(d_qkv.Download(&out));
        const std::vector<float> got = FromBf16Bits(out);
        std::ostringstream what;
        what << "rope d " << d << " theta " << theta << (int64 ? " int64" : " int32")
             << " positions (v columns must be untouched)";
        EXPECT_TRUE(AllClose(got.data(), want.data(), got.size(), kAtol, kRtol, Case(seed, what.str())));
      }
    }
  }
}

TEST(SwiGluGpu, MatchesReferenceOnFusedGateUp) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const uint64_t seed = 21;
  std::mt19937_64 rng(seed);
  const int T = 7, width = 1000;
  const std::vector<float> gu = RandomBf16Vector(static_cast<size_t>(T) * 2 * width, -4, 4, rng);
  std::vector<float> want(static_cast<size_t>(T) * width);
  for (int t = 0; t < T; ++t) {
    const float* row = gu.data() + static_cast<size_t>(t) * 2 * width;
    ref::SwiGlu(row, row + width, width, want.data() + static_cast<size_t>(t) * width);
  }
  DeviceArray<uint16_t> d_gu, d_out;
  NEEDLE_CUDA_ASSERT(d_gu.Upload(ToBf16Bits(gu)));
  NEEDLE_CUDA_ASSERT(d_out.Allocate(static_cast<size_t>(T) * width));
  SwiGluParams p;
  p.num_tokens = T;
  p.width = width;
  p.gate = Bf(d_gu);
  p.gate_stride = 2 * width;
  p.up = Bf(d_gu) + width;
  p.up_stride = 2 * width;
  p.out = Bf(d_out);
  p.out_stride = width;
  NEEDLE_CUDA_ASSERT(LaunchSwiGlu(p, nullptr));
  NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<uint16_t> out;
  NEEDLE_CUDA_ASSERT(d_out.Download(&out));
  const std::vector<float> got = FromBf16Bits(out);
  EXPECT_TRUE(AllClose(got.data(), want.data(), got.size(), kAtol, kRtol, Case(seed, "swiglu")));
}

TEST(GatesGpu, SigmoidAndGatedCombineMatchReference) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const uint64_t seed = 31;
  std::mt19937_64 rng(seed);
  const int T = 5, H = 8, dv = 24, logits_stride = 3 * H + 5;
  const std::vector<float> logits = RandomBf16Vector(static_cast<size_t>(T) * logits_stride, -6, 6, rng);
  std::vector<float> want_g(static_cast<size_t>(T) * H * 3);
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < 3 * H; ++j) want_g[t * 3 * H + j] = ref::Sigmoid(logits[t * logits_stride + j]);
  }
  DeviceArray<uint16_t> d_logits;
  DeviceArray<float> d_gates;
  NEEDLE_CUDA_ASSERT(d_logits.Upload(ToBf16Bits(logits)));
  NEEDLE_CUDA_ASSERT(d_gates.Allocate(want_g.size()));
  GateSigmoidParams gp;
  gp.num_tokens = T;
  gp.num_heads = H;
  gp.logits = Bf(d_logits);
  gp.logits_stride = logits_stride;
  gp.gates = d_gates.get();
  NEEDLE_CUDA_ASSERT(LaunchGateSigmoid(gp, nullptr));
  NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<float> gates;
  NEEDLE_CUDA_ASSERT(d_gates.Download(&gates));
  EXPECT_TRUE(AllClose(gates.data(), want_g.data(), gates.size(), 1e-6f, 1e-5f, Case(seed, "gate sigmoid")));

  // Combine with distinct branch strides; then without the window branch.
  const int64_t row = static_cast<int64_t>(H) * dv;
  const int64_t strides[3] = {row, row + 8, row + 16};
  std::vector<float> br[3];
  DeviceArray<uint16_t> d_br[3], d_out;
  for (int b = 0; b < 3; ++b) {
    br[b] = RandomBf16Vector(static_cast<size_t>(T) * strides[b], -3, 3, rng);
    NEEDLE_CUDA_ASSERT(d_br[b].Upload(ToBf16Bits(br[b])));
  }
  NEEDLE_CUDA_ASSERT(d_out.Allocate(static_cast<size_t>(T) * row));
  for (bool window : {true, false}) {
    std::vector<float> want(static_cast<size_t>(T) * row);
    for (int t = 0; t < T; ++t) {
      for (int h = 0; h < H; ++h) {
        for (int c = 0; c < dv; ++c) {
          double acc = 0;
          for (int b = 0; b < (window ? 3 : 2); ++b) {
            acc += static_cast<double>(gates[(t * H + h) * 3 + b]) * br[b][t * strides[b] + h * dv + c];
          }
          want[t * row + h * dv + c] = static_cast<float>(acc);
        }
      }
    }
    GatedCombineParams cp;
    cp.num_tokens = T;
    cp.num_heads = H;
    cp.head_dim = dv;
    cp.gates = d_gates.get();
    for (int b = 0; b < 3; ++b) {
      cp.branch[b] = (b < 2 || window) ? Bf(d_br[b]) : nullptr;
      cp.branch_stride[b] = strides[b];
    }
    cp.out = Bf(d_out);
    cp.out_stride = row;
    NEEDLE_CUDA_ASSERT(LaunchGatedCombine(cp, nullptr));
    NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
    std::vector<uint16_t> out;
    NEEDLE_CUDA_ASSERT(d_out.Download(&out));
    const std::vector<float> got = FromBf16Bits(out);
    EXPECT_TRUE(AllClose(got.data(), want.data(), got.size(), kAtol, kRtol,
                         Case(seed, window ? "gated combine" : "gated combine, no window branch")));
  }
}

struct GemmCase {
  int64_t rows, in, out;
  int64_t x_pad, y_pad;
  bool bias, accumulate;
  GemmOutput type;
};

TEST(GemmGpu, MatchesLinearReference) {
  NEEDLE_SKIP_WITHOUT_GPU();
  cublasLtHandle_t handle = nullptr;
  ASSERT_EQ(cublasLtCreate(&handle), CUBLAS_STATUS_SUCCESS);
  DeviceArray<uint8_t> d_ws;
  NEEDLE_CUDA_ASSERT(d_ws.Allocate(GemmWorkspaceBytes()));
  const std::vector<GemmCase> cases = {
      {1, 64, 48, 0, 0, false, false, GemmOutput::kBf16},    {7, 200, 136, 8, 8, true, false, GemmOutput::kBf16},
      {64, 256, 512, 0, 0, false, true, GemmOutput::kBf16},  {5, 64, 259, 0, 0, false, false, GemmOutput::kFp32},
      {33, 512, 1024, 16, 0, false, false, GemmOutput::kFp32}, {3, 96, 40, 0, 0, true, true, GemmOutput::kBf16},
  };
  uint64_t seed = 40;
  for (const GemmCase& c : cases) {
    ++seed;
    std::mt19937_64 rng(seed);
    const int64_t xs = c.in + c.x_pad, ys = c.out + c.y_pad;
    const std::vector<float> x = RandomBf16Vector(static_cast<size_t>(c.rows * xs), -1, 1, rng);
    const std::vector<float> w = RandomBf16Vector(static_cast<size_t>(c.out * c.in), -0.1f, 0.1f, rng);
    const std::vector<float> bias = RandomBf16Vector(static_cast<size_t>(c.out), -1, 1, rng);
    const std::vector<float> y0 = RandomBf16Vector(static_cast<size_t>(c.rows * ys), -1, 1, rng);
    std::vector<float> want(static_cast<size_t>(c.rows * c.out));
    for (int64_t r = 0; r < c.rows; ++r) {
      ref::Linear(w.data(), c.bias ? bias.data() : nullptr, x.data() + r * xs, static_cast<int>(c.in),
                  static_cast<int>(c.out), want.data() + r * c.out);
      if (c.accumulate) {
        for (int64_t o = 0; o < c.out; ++o) want[r * c.out + o] += y0[r * ys + o];
      }
    }
    DeviceArray<uint16_t> d_x, d_w, d_b, d_y16;
    DeviceArray<float> d_y32;
    NEEDLE_CUDA_ASSERT(d_x.Upload(ToBf16Bits(x)));
    NEEDLE_CUDA_ASSERT(d_w.Upload(ToBf16Bits(w)));
    NEEDLE_CUDA_ASSERT(d_b.Upload(ToBf16Bits(bias)));
    GemmParams p;
    p.rows = c.rows;
    p.in = c.in;
    p.out = c.out;
    p.x = Bf(d_x);
    p.x_stride = xs;
    p.w = Bf(d_w);
    p.w_stride = c.in;
    p.bias = c.bias ? Bf(d_b) : nullptr;
    p.y_stride = ys;
    p.y_type = c.type;
    p.accumulate = c.accumulate;
    if (c.type == GemmOutput::kBf16) {
      NEEDLE_CUDA_ASSERT(d_y16.Upload(ToBf16Bits(y0)));
      p.y = d_y16.get();
    } else {
      NEEDLE_CUDA_ASSERT(d_y32.Upload(y0));
      p.y = d_y32.get();
    }
    NEEDLE_CUDA_ASSERT(LaunchGemm(handle, p, d_ws.get(), GemmWorkspaceBytes(), nullptr));
    NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
    std::vector<float> got;
    std::vector<float> y_all;
    if (c.type == GemmOutput::kBf16) {
      std::vector<uint16_t> y;
      NEEDLE_CUDA_ASSERT(d_y16.Download(&y));
      y_all = FromBf16Bits(y);
    } else {
      NEEDLE_CUDA_ASSERT(d_y32.Download(&y_all));
    }
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t o = 0; o < c.out; ++o) got.push_back(y_all[r * ys + o]);
      for (int64_t o = c.out; o < ys; ++o) {
        ASSERT_EQ(y_all[r * ys + o], y0[r * ys + o]) << "seed " << seed << ": padding column " << o << " written";
      }
    }
    std::ostringstream what;
    what << "gemm rows " << c.rows << " in " << c.in << " out " << c.out << (c.bias ? " bias" : "")
         << (c.accumulate ? " accumulate" : "") << (c.type == GemmOutput::kBf16 ? " bf16" : " fp32");
    const float atol = c.type == GemmOutput::kBf16 ? kAtol : 1e-4f;
    const float rtol = c.type == GemmOutput::kBf16 ? kRtol : 1e-4f;
    EXPECT_TRUE(AllClose(got.data(), want.data(), got.size(), atol, rtol, Case(seed, what.str())));
  }
  cublasLtDestroy(handle);
}

// Device copy of a HostPagedPool plus the PagedPool describing it at `layer`.
struct DevicePool {
  DeviceArray<uint16_t> mem;
  PagedPool view;
  cudaError_t Init(const HostPagedPool& h, int layer) {
    view.page_stride = h.PageStride();
    view.layer = layer;
    view.num_kv_heads = h.num_kv_heads;
    view.rows_per_page = h.page_rows;
    view.head_dim = h.dim;
    const cudaError_t e = mem.Upload(h.data);
    view.base = Bf(mem);
    return e;
  }
};

// Expected image of a pool after writing `value` (dim floats) to (page, layer, head, row).
void ExpectRow(const HostPagedPool& pool, int32_t page, int layer, int head, int row, const float* value,
               std::vector<float>* expected, std::vector<char>* written) {
  const int64_t at = page * pool.PageStride() + pool.LayerOffset(layer) +
                     (static_cast<int64_t>(head) * pool.page_rows + row) * pool.dim;
  for (int c = 0; c < pool.dim; ++c) {
    (*expected)[at + c] = value[c];
    (*written)[at + c] = 1;
  }
}

struct AppendCase {
  const char* name;
  int page_rows, ring_pages;  // ring_pages 0: linear (selection pool)
  int64_t start;              // position of the first new token
  int num_tokens;
};

TEST(KvAppendGpu, WritesSelectionWindowRingAndStagingBySlotMapping) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const int layers = 2, layer = 1, Hkv = 2;
  const std::vector<AppendCase> cases = {
      {"selection", 16, 0, 5, 40},     // pages 0..2 of the sequence
      {"window ring", 16, 3, 20, 70},  // 70 tokens into a 48-row ring: the first 22 are skipped
      {"staging", 8, 1, 13, 11},       // l = 8 rows, one slot
      {"decode", 16, 0, 47, 1},
  };
  for (int dims = 0; dims < 2; ++dims) {
    const int dk = dims == 0 ? 24 : 64, dv = dims == 0 ? 16 : 64;
    uint64_t seed = 50 + dims * 10;
    for (const AppendCase& c : cases) {
      ++seed;
      std::mt19937_64 rng(seed);
      const int num_pages = 16;
      HostPagedPool hk(num_pages, layers, Hkv, c.page_rows, dk), hv(num_pages, layers, Hkv, c.page_rows, dv);
      PageAllocator alloc(num_pages, rng);
      const int64_t end = c.start + c.num_tokens;
      const int table_pages =
          c.ring_pages > 0 ? c.ring_pages : static_cast<int>((end + c.page_rows - 1) / c.page_rows);
      const std::vector<int32_t> table = alloc.Take(table_pages);
      ASSERT_EQ(static_cast<int>(table.size()), table_pages);
      // New rows in a fused [T][q | k | v] buffer.
      const int64_t qd = 32, stride = qd + Hkv * dk + Hkv * dv;
      const std::vector<float> qkv = RandomBf16Vector(static_cast<size_t>(c.num_tokens) * stride, -1, 1, rng);
      const int64_t ring_rows = static_cast<int64_t>(c.ring_pages) * c.page_rows;
      std::vector<int64_t> slots(c.num_tokens);
      std::vector<float> ek(hk.data.size()), ev(hv.data.size());
      std::vector<char> wk(hk.data.size(), 0), wv(hv.data.size(), 0);
      for (int t = 0; t < c.num_tokens; ++t) {
        const int64_t pos = c.start + t;
        // A ring row that a later token of this launch overwrites is skipped.
        if (c.ring_pages > 0 && pos + ring_rows < end) {
          slots[t] = -1;
          continue;
        }
        slots[t] = SlotForPosition(table.data(), c.page_rows, c.ring_pages, pos);
        int64_t logical = pos / c.page_rows;
        if (c.ring_pages > 0) logical %= c.ring_pages;
        for (int h = 0; h < Hkv; ++h) {
          const float* k = qkv.data() + t * stride + qd + h * dk;
          const float* v = qkv.data() + t * stride + qd + Hkv * dk + h * dv;
          ExpectRow(hk, table[logical], layer, h, static_cast<int>(pos % c.page_rows), k, &ek, &wk);
          ExpectRow(hv, table[logical], layer, h, static_cast<int>(pos % c.page_rows), v, &ev, &wv);
        }
      }
      DevicePool dk_pool, dv_pool;
      NEEDLE_CUDA_ASSERT(dk_pool.Init(hk, layer));
      NEEDLE_CUDA_ASSERT(dv_pool.Init(hv, layer));
      DeviceArray<uint16_t> d_qkv;
      DeviceArray<int64_t> d_slots;
      NEEDLE_CUDA_ASSERT(d_qkv.Upload(ToBf16Bits(qkv)));
      NEEDLE_CUDA_ASSERT(d_slots.Upload(slots));
      KvAppendParams p;
      p.num_tokens = c.num_tokens;
      p.k = Bf(d_qkv) + qd;
      p.k_stride = stride;
      p.v = Bf(d_qkv) + qd + Hkv * dk;
      p.v_stride = stride;
      p.slots = d_slots.get();
      p.k_pool = dk_pool.view;
      p.v_pool = dv_pool.view;
      NEEDLE_CUDA_ASSERT(LaunchKvAppend(p, nullptr));
      NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
      std::vector<uint16_t> gk, gv;
      NEEDLE_CUDA_ASSERT(dk_pool.mem.Download(&gk));
      NEEDLE_CUDA_ASSERT(dv_pool.mem.Download(&gv));
      const std::string what = std::string("kv append ") + c.name + " dk " + std::to_string(dk);
      EXPECT_TRUE(PoolMatches(gk, hk.data, ek, wk, 0, 0, Case(seed, what + " K")));
      EXPECT_TRUE(PoolMatches(gv, hv.data, ev, wv, 0, 0, Case(seed, what + " V")));
    }
  }
}

// One sequence of a compression test: its raw rows (contiguous, [len][Hkv][d] for K and V) and pages.
struct SeqRows {
  int64_t len;
  std::vector<float> k, v;
};

TEST(CompressMeanGpu, MatchesMeanRowsOverPermutedSelectionPages) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const int layers = 2, layer = 1, Hkv = 2, d = 64, P = 16, Pc = 4;
  struct Geo {
    int l, stride;
  };
  uint64_t seed = 70;
  for (const Geo g : {Geo{16, 16}, Geo{32, 16}, Geo{64, 64}}) {
    ++seed;
    std::mt19937_64 rng(seed);
    const int sel_pages = 24, cmp_pages = 12;
    HostPagedPool sk(sel_pages, layers, Hkv, P, d), sv(sel_pages, layers, Hkv, P, d);
    HostPagedPool ck(cmp_pages, layers, Hkv, Pc, d), cv(cmp_pages, layers, Hkv, Pc, d);
    PageAllocator sel_alloc(sel_pages, rng), cmp_alloc(cmp_pages, rng);
    std::vector<SeqRows> seqs = {{130, {}, {}}, {70, {}, {}}};
    std::vector<int32_t> sel_tables;  // concatenated
    std::vector<CompressItem> items;
    std::vector<float> ek(ck.data.size()), ev(cv.data.size());
    std::vector<char> wk(ck.data.size(), 0), wv(cv.data.size(), 0);
    for (SeqRows& s : seqs) {
      s.k = RandomBf16Vector(static_cast<size_t>(s.len) * Hkv * d, -2, 2, rng);
      s.v = RandomBf16Vector(static_cast<size_t>(s.len) * Hkv * d, -2, 2, rng);
      const int np = static_cast<int>((s.len + P - 1) / P);
      const std::vector<int32_t> table = sel_alloc.Take(np);
      ASSERT_EQ(static_cast<int>(table.size()), np);
      for (int h = 0; h < Hkv; ++h) {
        gpu_test::ScatterRows(s.k.data() + h * d, Hkv * d, 0, s.len, table.data(), 0, layer, h, &sk);
        gpu_test::ScatterRows(s.v.data() + h * d, Hkv * d, 0, s.len, table.data(), 0, layer, h, &sv);
      }
      const int64_t num_cmp = s.len < g.l ? 0 : (s.len - g.l) / g.stride + 1;
      const std::vector<int32_t> cmp_table = cmp_alloc.Take(static_cast<int>((num_cmp + Pc - 1) / Pc));
      for (int64_t i = 0; i < num_cmp; ++i) {
        CompressItem it;
        it.start = i * g.stride;
        it.dst_slot = SlotForPosition(cmp_table.data(), Pc, 0, i);
        it.table_offset = static_cast<int32_t>(sel_tables.size());
        items.push_back(it);
        std::vector<float> mk(d), mv(d);
        for (int h = 0; h < Hkv; ++h) {
          ref::MeanRows(ref::KvRows::Contiguous(s.k.data() + h * d, Hkv * d), it.start, g.l, d, mk.data());
          ref::MeanRows(ref::KvRows::Contiguous(s.v.data() + h * d, Hkv * d), it.start, g.l, d, mv.data());
          ExpectRow(ck, cmp_table[i / Pc], layer, h, static_cast<int>(i % Pc), mk.data(), &ek, &wk);
          ExpectRow(cv, cmp_table[i / Pc], layer, h, static_cast<int>(i % Pc), mv.data(), &ev, &wv);
        }
      }
      sel_tables.insert(sel_tables.end(), table.begin(), table.end());
    }
    DevicePool d_sk, d_sv, d_ck, d_cv;
    NEEDLE_CUDA_ASSERT(d_sk.Init(sk, layer));
    NEEDLE_CUDA_ASSERT(d_sv.Init(sv, layer));
    NEEDLE_CUDA_ASSERT(d_ck.Init(ck, layer));
    NEEDLE_CUDA_ASSERT(d_cv.Init(cv, layer));
    DeviceArray<int32_t> d_tables;
    DeviceArray<CompressItem> d_items;
    NEEDLE_CUDA_ASSERT(d_tables.Upload(sel_tables));
    NEEDLE_CUDA_ASSERT(d_items.Upload(items));
    CompressMeanParams p;
    p.num_items = static_cast<int>(items.size());
    p.items = d_items.get();
    p.block_len = g.l;
    p.src.k_pool = d_sk.view;
    p.src.v_pool = d_sv.view;
    p.src.page_table = d_tables.get();
    p.k_dst = d_ck.view;
    p.v_dst = d_cv.view;
    NEEDLE_CUDA_ASSERT(LaunchCompressMean(p, nullptr));
    NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
    std::vector<uint16_t> gk, gv;
    NEEDLE_CUDA_ASSERT(d_ck.mem.Download(&gk));
    NEEDLE_CUDA_ASSERT(d_cv.mem.Download(&gv));
    const std::string what = "compress mean l " + std::to_string(g.l) + " d " + std::to_string(g.stride);
    EXPECT_TRUE(PoolMatches(gk, ck.data, ek, wk, kAtol, kRtol, Case(seed, what + " K")));
    EXPECT_TRUE(PoolMatches(gv, cv.data, ev, wv, kAtol, kRtol, Case(seed, what + " V")));
  }
}

struct MlpGeo {
  int dk, dv, l, stride, hidden;
};

// nsa-paper compression during a step: sequence A is a prefill chunk of 5 strides, sequence B a decode
// step that completes a block; rows before each chunk come from the staging ring (holding only the
// last l rows), rows of the chunk from the fused chunk buffer.
TEST(CompressMlpGpu, MatchesMlpCompressFromStagingRingAndChunk) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const int layers = 2, layer = 1, Hkv = 2, Pc = 4;
  const double theta = 10000.0;
  uint64_t seed = 80;
  for (const MlpGeo g : {MlpGeo{24, 16, 8, 4, 32}, MlpGeo{192, 128, 32, 16, 64}}) {
    ++seed;
    std::mt19937_64 rng(seed);
    const int nk = g.l * g.dk, nv = g.l * g.dv;
    const std::vector<float> k_pos = RandomBf16Vector(static_cast<size_t>(nk), -0.5f, 0.5f, rng);
    const std::vector<float> v_pos = RandomBf16Vector(static_cast<size_t>(nv), -0.5f, 0.5f, rng);
    const float a1k = 1.0f / std::sqrt(static_cast<float>(nk)), a1v = 1.0f / std::sqrt(static_cast<float>(nv));
    const float a2 = 1.0f / std::sqrt(static_cast<float>(g.hidden));
    const std::vector<float> k_fc1 = RandomBf16Vector(static_cast<size_t>(g.hidden) * nk, -2 * a1k, 2 * a1k, rng);
    const std::vector<float> v_fc1 = RandomBf16Vector(static_cast<size_t>(g.hidden) * nv, -2 * a1v, 2 * a1v, rng);
    const std::vector<float> k_fc2 = RandomBf16Vector(static_cast<size_t>(g.dk) * g.hidden, -2 * a2, 2 * a2, rng);
    const std::vector<float> v_fc2 = RandomBf16Vector(static_cast<size_t>(g.dv) * g.hidden, -2 * a2, 2 * a2, rng);

    // Chunks: (start, length) per sequence, in units that keep both geometries meaningful.
    const int unit = g.stride;
    struct Chunk {
      int64_t s0;
      int len;
    };
    const std::vector<Chunk> chunks = {{3 * unit + 1, 5 * unit}, {7 * unit - 1 + g.l - g.stride, 1}};
    const int staging_slots = 5, cmp_pages = 16;
    HostPagedPool stk(staging_slots, layers, Hkv, g.l, g.dk), stv(staging_slots, layers, Hkv, g.l, g.dv);
    HostPagedPool ck(cmp_pages, layers, Hkv, Pc, g.dk), cv(cmp_pages, layers, Hkv, Pc, g.dv);
    PageAllocator stg_alloc(staging_slots, rng), cmp_alloc(cmp_pages, rng);
    int total_rows = 0;
    for (const Chunk& c : chunks) total_rows += c.len;
    // Chunk buffer: [rows][q | k | v] with a q part the kernel must skip.
    const int64_t qd = 16, kstride = qd + Hkv * g.dk + Hkv * g.dv;
    std::vector<float> chunk_buf(static_cast<size_t>(total_rows) * kstride, 0.0f);
    std::vector<int32_t> tables;
    std::vector<CompressItem> items;
    std::vector<float> ek(ck.data.size()), ev(cv.data.size());
    std::vector<char> wk(ck.data.size(), 0), wv(cv.data.size(), 0);
    int row0 = 0;
    for (const Chunk& c : chunks) {
      const int64_t end = c.s0 + c.len;
      const std::vector<float> all_k = RandomBf16Vector(static_cast<size_t>(end) * Hkv * g.dk, -2, 2, rng);
      const std::vector<float> all_v = RandomBf16Vector(static_cast<size_t>(end) * Hkv * g.dv, -2, 2, rng);
      const std::vector<int32_t> slot = stg_alloc.Take(1);
      ASSERT_EQ(slot.size(), 1u);
      // Staging ring: the last l rows before the chunk.
      const int64_t first = c.s0 - g.l > 0 ? c.s0 - g.l : 0;
      for (int h = 0; h < Hkv; ++h) {
        gpu_test::ScatterRows(all_k.data() + first * Hkv * g.dk + h * g.dk, Hkv * g.dk, first, c.s0 - first,
                              slot.data(), 1, layer, h, &stk);
        gpu_test::ScatterRows(all_v.data() + first * Hkv * g.dv + h * g.dv, Hkv * g.dv, first, c.s0 - first,
                              slot.data(), 1, layer, h, &stv);
      }
      for (int t = 0; t < c.len; ++t) {
        float* dst = chunk_buf.data() + static_cast<size_t>(row0 + t) * kstride;
        const float* k = all_k.data() + (c.s0 + t) * Hkv * g.dk;
        const float* v = all_v.data() + (c.s0 + t) * Hkv * g.dv;
        std::copy(k, k + Hkv * g.dk, dst + qd);
        std::copy(v, v + Hkv * g.dv, dst + qd + Hkv * g.dk);
      }
      const int64_t num_cmp = end < g.l ? 0 : (end - g.l) / g.stride + 1;
      const std::vector<int32_t> cmp_table = cmp_alloc.Take(static_cast<int>((num_cmp + Pc - 1) / Pc));
      for (int64_t t = c.s0; t < end; ++t) {
        if (!(t + 1 >= g.l && (t + 1 - g.l) % g.stride == 0)) continue;  // completes a block
        const int64_t i = (t + 1 - g.l) / g.stride;
        CompressItem it;
        it.start = i * g.stride;
        it.tail_start = c.s0;
        it.tail_row0 = row0;
        it.dst_slot = SlotForPosition(cmp_table.data(), Pc, 0, i);
        it.table_offset = static_cast<int32_t>(tables.size());
        items.push_back(it);
        std::vector<float> mk(g.dk), mv(g.dv);
        for (int h = 0; h < Hkv; ++h) {
          ref::MlpCompress(ref::KvRows::Contiguous(all_k.data() + h * g.dk, Hkv * g.dk), it.start, g.l, g.dk,
                           k_pos.data(), k_fc1.data(), k_fc2.data(), g.hidden, mk.data());
          ref::ApplyRope(mk.data(), g.dk, it.start, theta);
          ref::MlpCompress(ref::KvRows::Contiguous(all_v.data() + h * g.dv, Hkv * g.dv), it.start, g.l, g.dv,
                           v_pos.data(), v_fc1.data(), v_fc2.data(), g.hidden, mv.data());
          ExpectRow(ck, cmp_table[i / Pc], layer, h, static_cast<int>(i % Pc), mk.data(), &ek, &wk);
          ExpectRow(cv, cmp_table[i / Pc], layer, h, static_cast<int>(i % Pc), mv.data(), &ev, &wv);
        }
      }
      tables.push_back(slot[0]);
      row0 += c.len;
    }
    ASSERT_GE(items.size(), 3u) << "test geometry produces too few compressed tokens";
    DevicePool d_stk, d_stv, d_ck, d_cv;
    NEEDLE_CUDA_ASSERT(d_stk.Init(stk, layer));
    NEEDLE_CUDA_ASSERT(d_stv.Init(stv, layer));
    NEEDLE_CUDA_ASSERT(d_ck.Init(ck, layer));
    NEEDLE_CUDA_ASSERT(d_cv.Init(cv, layer));
    DeviceArray<int32_t> d_tables;
    DeviceArray<CompressItem> d_items;
    DeviceArray<uint16_t> d_chunk, d_kpos, d_vpos, d_kfc1, d_vfc1, d_kfc2, d_vfc2;
    DeviceArray<uint8_t> d_ws;
    NEEDLE_CUDA_ASSERT(d_tables.Upload(tables));
    NEEDLE_CUDA_ASSERT(d_items.Upload(items));
    NEEDLE_CUDA_ASSERT(d_chunk.Upload(ToBf16Bits(chunk_buf)));
    NEEDLE_CUDA_ASSERT(d_kpos.Upload(ToBf16Bits(k_pos)));
    NEEDLE_CUDA_ASSERT(d_vpos.Upload(ToBf16Bits(v_pos)));
    NEEDLE_CUDA_ASSERT(d_kfc1.Upload(ToBf16Bits(k_fc1)));
    NEEDLE_CUDA_ASSERT(d_vfc1.Upload(ToBf16Bits(v_fc1)));
    NEEDLE_CUDA_ASSERT(d_kfc2.Upload(ToBf16Bits(k_fc2)));
    NEEDLE_CUDA_ASSERT(d_vfc2.Upload(ToBf16Bits(v_fc2)));
    NEEDLE_CUDA_ASSERT(d_ws.Allocate(CompressMlpWorkspaceBytes(static_cast<int>(items.size()), Hkv, g.hidden)));
    ASSERT_TRUE(CompressMlpSupported(g.l, g.dk, g.dv));
    CompressMlpParams p;
    p.num_items = static_cast<int>(items.size());
    p.items = d_items.get();
    p.block_len = g.l;
    p.hidden = g.hidden;
    p.rope_theta = theta;
    p.src.k_pool = d_stk.view;
    p.src.v_pool = d_stv.view;
    p.src.page_table = d_tables.get();
    p.src.ring_pages = 1;
    p.src.k_tail = Bf(d_chunk) + qd;
    p.src.k_tail_stride = kstride;
    p.src.v_tail = Bf(d_chunk) + qd + Hkv * g.dk;
    p.src.v_tail_stride = kstride;
    p.k_dst = d_ck.view;
    p.v_dst = d_cv.view;
    p.k_pos = Bf(d_kpos);
    p.k_fc1 = Bf(d_kfc1);
    p.k_fc2 = Bf(d_kfc2);
    p.v_pos = Bf(d_vpos);
    p.v_fc1 = Bf(d_vfc1);
    p.v_fc2 = Bf(d_vfc2);
    NEEDLE_CUDA_ASSERT(LaunchCompressMlp(p, d_ws.get(), nullptr));
    NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
    std::vector<uint16_t> gk, gv;
    NEEDLE_CUDA_ASSERT(d_ck.mem.Download(&gk));
    NEEDLE_CUDA_ASSERT(d_cv.mem.Download(&gv));
    const std::string what = "compress mlp dk " + std::to_string(g.dk) + " l " + std::to_string(g.l) + ", " +
                             std::to_string(items.size()) + " items";
    EXPECT_TRUE(PoolMatches(gk, ck.data, ek, wk, kAtol, kRtol, Case(seed, what + " K (RoPE'd)")));
    EXPECT_TRUE(PoolMatches(gv, cv.data, ev, wv, kAtol, kRtol, Case(seed, what + " V")));
  }
}

}  // namespace
}  // namespace needle::kernels
