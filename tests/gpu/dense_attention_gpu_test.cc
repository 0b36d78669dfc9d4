// GPU tests of the dense paged attention kernel (kernels/dense_attention.h), decode and prefill
// chunks (the tensor-core prefill path and the simple kernel), against reference::DenseAttention on
// contiguous rows. Inputs are random and rounded to bf16 first; the kernel reads the same rows
// scattered into randomly permuted pages of NaN-filled pools, so reading past row t of a query gives
// NaN. Every element within 2e-4 + 1e-2 |e|; the reference runs on all cores (the long-context
// cases take billions of multiply-adds).
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

#include "kernels/dense_attention.h"
#include "kernels/reference/attention_ref.h"
#include "tests/gpu/gpu_test_util.h"

namespace needle::kernels {
namespace {

namespace ref = reference;
using gpu_test::DeviceArray;
using gpu_test::DevicePagedCache;

constexpr float kAtol = 2e-4f;
constexpr float kRtol = 1e-2f;

struct SeqSpec {
  int start;  // position of the first query
  int len;    // queries start..start+len-1
};

struct DenseCase {
  std::string name;
  int dk;
  int dv;
  int num_kv_heads;
  int group;
  std::vector<SeqSpec> seqs;
  int page_rows = 64;
  uint64_t seed = 1;
  bool simple_prefill = false;  // prefill: force the simple kernel (DenseAttentionParams::simple_prefill)
  bool p_bf16 = false;          // prefill: DenseAttentionParams::prefill_p_bf16
  float atol = kAtol;
  bool cp_async = false;  // split-KV decode: DenseAttentionParams::cp_async_copies
};

// Absolute tolerance of the prefill path with P rounded to bf16 once: the rounding moves each
// output element by at most u sum_j p_j |v_j| / sum_j p_j <= u max|v| (bf16 unit roundoff u = 2^-8;
// v in [-1, 1] here), plus kAtol.
constexpr float kAtolPBf16 = 1.0f / 256 + kAtol;

std::vector<SeqSpec> DecodeAt(const std::vector<int>& positions) {
  std::vector<SeqSpec> s;
  for (int t : positions) s.push_back({t, 1});
  return s;
}

// Decode launch path: the single-kernel path (no workspace), or the split-KV path with automatic
// splits (kAutoSplits) or k chunks (64 rows) per split.
constexpr int kSingleKernel = -1;
constexpr int kAutoSplits = 0;

// split_chunks picks the decode path; max_context_slack is added to the batch's largest position + 1
// to form params.max_context (an upper bound, not necessarily tight).
void RunDenseCase(const DenseCase& c, bool decode, int split_chunks = kSingleKernel, int max_context_slack = 0) {
  SCOPED_TRACE("case " + c.name + (decode ? " (decode)" : " (prefill)") + " seed " + std::to_string(c.seed));
  std::mt19937_64 rng(c.seed);
  const int hkv = c.num_kv_heads, G = c.group, H = hkv * G, dk = c.dk, dv = c.dv;
  const int num_seqs = static_cast<int>(c.seqs.size());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dk)));

  std::vector<std::vector<float>> k(num_seqs), v(num_seqs);  // [Hkv][rows][d]
  std::vector<const float*> k_src, v_src;
  std::vector<int64_t> rows;
  std::vector<int32_t> cu{0}, start;
  for (int s = 0; s < num_seqs; ++s) {
    if (decode) {
      ASSERT_EQ(c.seqs[s].len, 1);
    }
    rows.push_back(c.seqs[s].start + c.seqs[s].len);
    k[s] = gpu_test::RandomBf16Vector(hkv * rows[s] * dk, -2.0f, 2.0f, rng);
    v[s] = gpu_test::RandomBf16Vector(hkv * rows[s] * dv, -1.0f, 1.0f, rng);
    k_src.push_back(k[s].data());
    v_src.push_back(v[s].data());
    cu.push_back(cu.back() + c.seqs[s].len);
    start.push_back(c.seqs[s].start);
  }
  const int num_tokens = cu.back();
  std::vector<float> q = gpu_test::RandomBf16Vector(static_cast<size_t>(num_tokens) * H * dk, -2.0f, 2.0f, rng);

  DevicePagedCache cache;
  ASSERT_NO_FATAL_FAILURE(
      gpu_test::BuildDevicePagedCache(k_src, v_src, rows, rows, hkv, dk, dv, c.page_rows, 0, rng, &cache));
  DeviceArray<uint16_t> d_q, d_out;
  DeviceArray<int32_t> d_cu, d_start;
  NEEDLE_CUDA_ASSERT(d_q.Upload(gpu_test::ToBf16Bits(q)));
  NEEDLE_CUDA_ASSERT(d_out.Allocate(static_cast<size_t>(num_tokens) * H * dv));
  NEEDLE_CUDA_ASSERT(d_out.Fill(0xFF));
  NEEDLE_CUDA_ASSERT(d_cu.Upload(cu));
  NEEDLE_CUDA_ASSERT(d_start.Upload(start));

  DenseAttentionParams p;
  p.q = reinterpret_cast<const __nv_bfloat16*>(d_q.get());
  p.out = reinterpret_cast<__nv_bfloat16*>(d_out.get());
  p.cu_tokens = decode ? nullptr : d_cu.get();
  p.start_pos = d_start.get();
  p.num_seqs = num_seqs;
  p.num_tokens = num_tokens;
  p.num_heads = H;
  p.num_kv_heads = hkv;
  p.head_dim_qk = dk;
  p.head_dim_v = dv;
  p.softmax_scale = scale;
  p.kv = cache.view;
  p.simple_prefill = c.simple_prefill;
  p.prefill_p_bf16 = c.p_bf16;
  p.cp_async_copies = c.cp_async;
  DeviceArray<uint8_t> d_workspace;
  if (split_chunks == kSingleKernel) {
    ASSERT_EQ(DenseAttentionWorkspaceBytes(num_tokens, hkv, G, 1), 0u);
    NEEDLE_CUDA_ASSERT(LaunchDenseAttention(p, nullptr, nullptr));
  } else {
    ASSERT_TRUE(decode);
    ASSERT_TRUE(DenseAttentionSplitKvSupported(dk, dv, G));
    p.max_context = static_cast<int>(*std::max_element(rows.begin(), rows.end())) + max_context_slack;
    p.chunks_per_split = split_chunks;
    // Whole-chunk pages on sm_90 are copied as tensor-map boxes unless the case asks for cp.async.
    int device = 0, major = 0;
    NEEDLE_CUDA_ASSERT(cudaGetDevice(&device));
    NEEDLE_CUDA_ASSERT(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    EXPECT_EQ(DenseAttentionSplitKvCopiesBoxes(p), !c.cp_async && c.page_rows % 64 == 0 && major >= 9);
    const size_t bytes = DenseAttentionSplitKvWorkspaceBytes(p);
    ASSERT_GT(bytes, 0u);
    NEEDLE_CUDA_ASSERT(d_workspace.Allocate(bytes));
    NEEDLE_CUDA_ASSERT(d_workspace.Fill(0xFF));  // NaN garbage: the path needs no initialisation
    NEEDLE_CUDA_ASSERT(LaunchDenseAttention(p, d_workspace.get(), bytes, nullptr));
    std::vector<uint8_t> ws;
    NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
    NEEDLE_CUDA_ASSERT(d_workspace.Download(&ws));
    ASSERT_TRUE(std::any_of(ws.begin(), ws.end(), [](uint8_t b) { return b != 0xFF; }))
        << "the split-KV path did not run";
  }
  NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<uint16_t> out_bits;
  NEEDLE_CUDA_ASSERT(d_out.Download(&out_bits));
  const std::vector<float> out = gpu_test::FromBf16Bits(out_bits);

  // Every (token, KV head) against the reference, tokens spread over the cores; once a token fails
  // the workers stop, and the failure of the lowest failing token found is reported.
  std::vector<std::pair<int, int>> items;  // (sequence, index in its chunk)
  for (int s = 0; s < num_seqs; ++s) {
    for (int i = 0; i < c.seqs[s].len; ++i) items.push_back({s, i});
  }
  const std::string failure = gpu_test::ParallelCheck(items.size(), [&](size_t n) -> std::string {
    std::vector<float> expected(static_cast<size_t>(G) * dv);
    const int s = items[n].first, i = items[n].second;
    const int token = cu[s] + i;
    const int64_t t = c.seqs[s].start + i;
    for (int h = 0; h < hkv; ++h) {
      const ref::KvRows kr = ref::KvRows::Contiguous(k[s].data() + h * rows[s] * dk, dk);
      const ref::KvRows vr = ref::KvRows::Contiguous(v[s].data() + h * rows[s] * dv, dv);
      const size_t head0 = static_cast<size_t>(token) * H + static_cast<size_t>(h) * G;
      ref::DenseAttention(q.data() + head0 * dk, G, dk, dv, kr, vr, t, scale, expected.data());
      std::ostringstream where;
      where << "seed " << c.seed << " case " << c.name << " token " << token << " (sequence " << s << ", position "
            << t << ") KV head " << h << ", output [G][d_v] of the group";
      const ::testing::AssertionResult r =
          gpu_test::AllClose(out.data() + head0 * dv, expected.data(), expected.size(), c.atol, kRtol, where.str());
      if (!r) return r.message();
    }
    return "";
  });
  ASSERT_TRUE(failure.empty()) << failure;
}

const std::vector<int> kPositions = {0, 1, 2, 31, 63, 64, 65, 127, 128, 1000, 4095};

TEST(DenseAttentionGpuTest, Decode) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<DenseCase> cases = {
      {"d64 G1", 64, 64, 4, 1, DecodeAt(kPositions)},
      {"d128 G4", 128, 128, 2, 4, DecodeAt(kPositions)},
      {"d192/128 G16", 192, 128, 2, 16, DecodeAt(kPositions)},
      {"d192/128 G32", 192, 128, 1, 32, DecodeAt(kPositions)},
      {"d192/192 G8", 192, 192, 2, 8, DecodeAt(kPositions)},
      {"d64 G64", 64, 64, 1, 64, DecodeAt({0, 63, 64, 1000})},
      {"d128 G3 pages16", 128, 128, 2, 3, DecodeAt(kPositions), 16},
      {"d16 G2 (tiny-llama)", 16, 16, 2, 2, DecodeAt(kPositions), 16},
      {"d32 G4 (demo)", 32, 32, 2, 4, DecodeAt(kPositions)},
      {"d24/16 G2 (tiny-nsa-paper)", 24, 16, 2, 2, DecodeAt(kPositions), 16},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    DenseCase c = cases[i];
    c.seed = 700 + i;
    ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/true));
  }
}

TEST(DenseAttentionGpuTest, DecodeLongContext) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<DenseCase> cases = {
      {"d192/128 G16 64k", 192, 128, 1, 16, DecodeAt({65535})},
      {"d64 G32 64k+20k", 64, 64, 1, 32, DecodeAt({65535, 20000})},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    DenseCase c = cases[i];
    c.seed = 800 + i;
    ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/true));
  }
}

// The split-KV decode path: GQA-packed tensor-core tiles, splits merged by log-sum-exp.
TEST(DenseAttentionGpuTest, SplitKvDecode) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<DenseCase> cases = {
      {"d64 G1", 64, 64, 4, 1, DecodeAt(kPositions)},
      {"d128 G4", 128, 128, 2, 4, DecodeAt(kPositions)},
      {"d192/128 G16", 192, 128, 2, 16, DecodeAt(kPositions)},
      {"d192/128 G32", 192, 128, 1, 32, DecodeAt(kPositions)},
      {"d64 G64", 64, 64, 1, 64, DecodeAt({0, 63, 64, 1000})},
      {"d128 G3 pages16", 128, 128, 2, 3, DecodeAt(kPositions), 16},
      {"d128 G16 pages128", 128, 128, 2, 16, DecodeAt(kPositions), 128},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    for (bool cp_async : {false, true}) {  // tensor-map boxes where the pages allow them, and cp.async
      DenseCase c = cases[i];
      c.cp_async = cp_async;
      c.seed = 1700 + i + (cp_async ? 500 : 0);
      ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/true, kAutoSplits));
      c.seed += 50;
      ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/true, 1, /*max_context_slack=*/100));
      c.seed += 50;
      ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/true, 3));
    }
  }
}

TEST(DenseAttentionGpuTest, SplitKvDecodeLongContext) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<DenseCase> cases = {
      {"d192/128 G16 64k", 192, 128, 1, 16, DecodeAt({65535})},
      {"d128 G16 128k+20k", 128, 128, 1, 16, DecodeAt({131071, 20000})},
      {"d64 G16 128k", 64, 64, 1, 16, DecodeAt({131071})},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    DenseCase c = cases[i];
    c.seed = 1800 + i;
    ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/true, kAutoSplits));
  }
}

// Enough (sequence, KV head) pairs that each has few splits, so the merge kernel takes several query
// heads per thread block: up to 16 at d 64 and 8 at d_v 128 with automatic splits, fewer with their
// splits spread over several thread groups when each split is 3 chunks.
TEST(DenseAttentionGpuTest, SplitKvDecodeMergeSeveralHeadsPerBlock) {
  NEEDLE_SKIP_WITHOUT_GPU();
  auto positions = [](int seqs) {
    std::vector<int> p;
    for (int s = 0; s < seqs; ++s) p.push_back(100 + s * 89 % 1900);
    return p;
  };
  const std::vector<DenseCase> cases = {
      {"d64 G16 40 x 4 KV heads", 64, 64, 4, 16, DecodeAt(positions(40))},
      {"d192/128 G16 40 x 2 KV heads", 192, 128, 2, 16, DecodeAt(positions(40))},
      {"d192/128 G16 12 x 2 KV heads", 192, 128, 2, 16, DecodeAt(positions(12))},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    DenseCase c = cases[i];
    c.seed = 1900 + i;
    ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/true, kAutoSplits));
    c.seed += 50;
    ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/true, 3));
  }
}

TEST(DenseAttentionGpuTest, PrefillChunks) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<DenseCase> cases = {
      {"d128 G4", 128, 128, 2, 4, {{0, 70}, {100, 129}, {4000, 3}}},
      {"d192/128 G16", 192, 128, 1, 16, {{0, 65}, {1000, 64}}},
      {"d192/192 G4", 192, 192, 2, 4, {{0, 65}, {300, 40}}},
      {"d64 G1 empty sequence", 64, 64, 3, 1, {{0, 10}, {50, 0}, {63, 2}}},
      {"d16 G2", 16, 16, 2, 2, {{0, 40}, {17, 30}}, 16},
      {"d24/16 G2", 24, 16, 1, 2, {{5, 20}}, 16},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    DenseCase c = cases[i];
    c.seed = 900 + i;
    ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/false));
  }
  // The simple kernel on shapes the tensor-core prefill path would take (d16, d24/16 and d192/192
  // above run it anyway: the prefill path does not instantiate them).
  EXPECT_FALSE(DenseAttentionPrefillSupported(16, 16, 2));
  EXPECT_FALSE(DenseAttentionPrefillSupported(192, 192, 4));
  for (size_t i = 0; i < 2; ++i) {
    DenseCase c = cases[i];
    c.seed = 950 + i;
    c.name += " simple kernel";
    c.simple_prefill = true;
    ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/false));
  }
}

// The tensor-core prefill path (64-row tiles of (token, head) pairs, causal mask per row) for each
// instantiated head-dim pair and G in {1, 4, 16, 32}: ragged batches, chunks at position 0 and
// mid-sequence, lengths 1, 3, 65, 130 and 600 (not multiples of a tile's 64 / G tokens), pages of
// 16 and 64 rows in permuted order, one empty sequence.
TEST(DenseAttentionGpuTest, PrefillTensorCore) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const int dims[3][2] = {{192, 128}, {128, 128}, {64, 64}};
  const int groups[4] = {1, 4, 16, 32};
  uint64_t seed = 2000;
  for (const auto& d : dims) {
    for (int G : groups) {
      ASSERT_TRUE(DenseAttentionPrefillSupported(d[0], d[1], G));
      const int hkv = G <= 4 ? 2 : 1;
      const std::string name = "d" + std::to_string(d[0]) + "/" + std::to_string(d[1]) + " G" + std::to_string(G);
      DenseCase at_zero{name + " from 0, pages16",
                        d[0], d[1], hkv, G, {{0, 1}, {0, 3}, {0, 65}, {0, 130}, {0, 600}}, 16};
      at_zero.seed = seed++;
      ASSERT_NO_FATAL_FAILURE(RunDenseCase(at_zero, /*decode=*/false));
      DenseCase mid{name + " mid-sequence, pages64",
                    d[0], d[1], hkv, G, {{100, 1}, {77, 3}, {1000, 65}, {40, 0}, {63, 130}, {300, 600}}, 64};
      mid.seed = seed++;
      ASSERT_NO_FATAL_FAILURE(RunDenseCase(mid, /*decode=*/false));
      DenseCase p_bf16 = mid;  // P rounded to bf16 once, checked against the bound it promises
      p_bf16.name += " P bf16";
      p_bf16.p_bf16 = true;
      p_bf16.atol = kAtolPBf16;
      p_bf16.seed = seed++;
      ASSERT_NO_FATAL_FAILURE(RunDenseCase(p_bf16, /*decode=*/false));
    }
  }
}

TEST(DenseAttentionGpuTest, PrefillTensorCoreLongContext) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<DenseCase> cases = {
      {"d64 G1 8k chunk at 56k", 64, 64, 1, 1, {{57344, 8192}}, 64},
      {"d192/128 G16 at 56k + ragged", 192, 128, 1, 16, {{57344, 70}, {5000, 33}}, 16},
      {"d128 G4 at 30k", 128, 128, 2, 4, {{30000, 130}}, 64},
      {"d192/128 G16 at 56k P bf16", 192, 128, 1, 16, {{57344, 70}}, 16, 1, false, true, kAtolPBf16},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    DenseCase c = cases[i];
    c.seed = 2100 + i;
    ASSERT_NO_FATAL_FAILURE(RunDenseCase(c, /*decode=*/false));
  }
}

TEST(DenseAttentionGpuTest, RejectsUnsupportedParams) {
  EXPECT_TRUE(DenseAttentionSupported(128, 128, 8));
  EXPECT_FALSE(DenseAttentionSupported(80, 80, 8));
  EXPECT_FALSE(DenseAttentionSupported(64, 64, 0));
  DenseAttentionParams p;
  p.num_seqs = 1;
  p.num_tokens = 1;
  p.num_heads = 8;
  p.num_kv_heads = 3;  // not a divisor
  p.head_dim_qk = 64;
  p.head_dim_v = 64;
  EXPECT_EQ(LaunchDenseAttention(p, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchDenseAttention(p, nullptr, 0, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(DenseAttentionSplitKvWorkspaceBytes(p), 0u);
  EXPECT_TRUE(DenseAttentionSplitKvSupported(128, 128, 16));
  EXPECT_FALSE(DenseAttentionSplitKvSupported(24, 16, 2));
}

}  // namespace
}  // namespace needle::kernels
