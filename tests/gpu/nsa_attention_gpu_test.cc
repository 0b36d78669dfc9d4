// GPU tests of the NSA decode and prefill kernels (kernels/nsa_decode.h, kernels/nsa_prefill.h)
// against the CPU reference (kernels/reference/attention_ref.h). Inputs are random, rounded to bf16
// before the reference sees them; the reference reads contiguous per-sequence rows while the kernel
// reads the same rows scattered into randomly permuted pages of NaN-filled pools (layer 1 of two),
// so a paging or masking bug shows up as a mismatch or a NaN. Every output element must satisfy
// |a - e| <= 2e-4 + 1e-2 |e| (the kernel's only expected error is fp32 arithmetic plus the bf16
// rounding of its output, <= 0.2%). Decode cases plant dominant keys at the window's and the
// current block's edges so an off-by-one there is far outside that tolerance.
//
// Selection: where the reference's top-n boundary is well separated the kernel's block ids must equal
// SelectBlocks' exactly; where two candidate scores are within 1e-3 (relative) of each other the
// kernel may pick either, and its output is then compared with the reference branches run on the
// kernel's blocks. The tie case (all compressed keys zero) demands exact ids: ties go to the lower
// block index.
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

#include "kernels/nsa_decode.h"
#include "kernels/nsa_prefill.h"
#include "kernels/reference/attention_ref.h"
#include "tests/gpu/gpu_test_util.h"

namespace needle::kernels {
namespace {

namespace ref = reference;
using gpu_test::BuildDevicePagedCache;
using gpu_test::DeviceArray;
using gpu_test::DevicePagedCache;

constexpr float kAtol = 2e-4f;
constexpr float kRtol = 1e-2f;
constexpr double kTieRelative = 1e-3;  // block scores closer than this may be ordered either way

NsaKernelGeometry PaperGeometry() { return {32, 16, 64, 16, 1, 2, 512}; }
NsaKernelGeometry FlaGeometry(int forced_initial, int forced_local) {
  return {64, 64, 64, 16, forced_initial, forced_local, 512};
}

ref::NsaGeometry RefGeometry(const NsaKernelGeometry& g) {
  return {g.cmp_block,      g.cmp_stride,   g.sel_block, g.num_selected,
          g.forced_initial, g.forced_local, g.window,    g.topk_merge_chunk};
}

int64_t NumCompressed(const NsaKernelGeometry& g, int64_t t) {
  return t + 1 < g.cmp_block ? 0 : (t + 1 - g.cmp_block) / g.cmp_stride + 1;
}

// Queries at positions start..start+len-1 of one sequence (decode: len 1).
struct SeqSpec {
  int start;
  int len;
};

struct NsaCase {
  std::string name;
  NsaKernelGeometry geo;
  int dk;
  int dv;
  int num_kv_heads;
  int group;
  bool shared_kv;
  std::vector<SeqSpec> seqs;
  int page_rows = 64;      // selection and window pages
  int cmp_page_rows = 64;  // compressed pages
  GateDType gate_dtype = GateDType::kBf16;
  bool zero_cmp_keys = false;  // all compressed keys 0: every interior block score ties
  uint64_t seed = 1;
  // Prefill with a window ring: -1 passes the chunk's window K and V as two contiguous buffers
  // (stride 0). pad >= 0 lays them out as the CUDA executor's fused projection output does: one
  // buffer whose token rows are [pad][K][pad][V][pad], the pads bf16 NaN, with K and V pointing into
  // it and both strides the row width, so a kernel that assumes contiguous rows reads V or NaN.
  int chunk_pad = -1;
  bool tensor_cores = false;  // prefill: the tensor-core path must run (NsaPrefillUsesTensorCores)
  bool cp_async = false;      // split-KV decode: NsaDecodeParams::cp_async_copies
};

// Whether the split-KV decode should copy a branch's chunks as tensor-map boxes: sm_90, pages of
// whole 64-row chunks, and chunks that start on multiples of 64 rows (selected blocks: l' a multiple
// of 64; compressed: no overlapping tokens, l = d, and l' / d dividing 64).
bool ExpectBoxes(const NsaCase& c, bool compressed) {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return false;
  }
  if (c.cp_async || major < 9) return false;
  const NsaKernelGeometry& g = c.geo;
  if (!compressed) return c.page_rows % 64 == 0 && g.sel_block % 64 == 0;
  return c.cmp_page_rows % 64 == 0 && g.cmp_block == g.cmp_stride && g.sel_block % g.cmp_stride == 0 &&
         64 % (g.sel_block / g.cmp_stride) == 0;
}

std::vector<SeqSpec> DecodeAt(const std::vector<int>& positions) {
  std::vector<SeqSpec> s;
  for (int t : positions) s.push_back({t, 1});
  return s;
}

// Host data of one sequence: rows 0..rows-1 of every branch, per KV head, contiguous.
struct HostSeq {
  int64_t rows = 0;      // selection/window rows
  int64_t cmp_rows = 0;  // compressed rows
  std::vector<float> kc, vc, ks, vs, kw, vw;  // [Hkv][rows][d]
};

// The reference NSA output for one query group with the given selected blocks (NsaAttention's
// branches with SelectBlocks replaced by `blocks`).
void RefNsaWithBlocks(const float* q, const float* gates, int G, int dk, int dv, const ref::NsaBranchRows& rows,
                      int64_t t, float scale, const ref::NsaGeometry& g, const std::vector<int64_t>& blocks,
                      float* out) {
  std::vector<float> o_cmp(static_cast<size_t>(G) * dv), o_slc(o_cmp.size()), o_win(o_cmp.size(), 0.0f);
  const ref::RowRange cmp_range{0, g.NumCompressed(t)};
  ref::AttendRanges(q, G, dk, dv, rows.kc, rows.vc, &cmp_range, 1, scale, o_cmp.data(), nullptr);
  std::vector<ref::RowRange> ranges = ref::SelectedRanges(blocks, t, g.sel_block);
  ref::AttendRanges(q, G, dk, dv, rows.ks, rows.vs, ranges.data(), static_cast<int>(ranges.size()), scale,
                    o_slc.data(), nullptr);
  if (g.window > 0) {
    const ref::RowRange win = ref::WindowRange(t, g.window);
    ref::AttendRanges(q, G, dk, dv, rows.kw, rows.vw, &win, 1, scale, o_win.data(), nullptr);
  }
  for (int h = 0; h < G; ++h) {
    for (int c = 0; c < dv; ++c) {
      const size_t i = static_cast<size_t>(h) * dv + c;
      out[i] = static_cast<float>(static_cast<double>(gates[3 * h]) * o_cmp[i] +
                                  static_cast<double>(gates[3 * h + 1]) * o_slc[i] +
                                  static_cast<double>(gates[3 * h + 2]) * o_win[i]);
    }
  }
}

std::string BlocksString(const std::vector<int64_t>& b) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < b.size(); ++i) s << (i ? " " : "") << b[i];
  s << "]";
  return s.str();
}

// Checks the kernel's selected blocks against the reference's for one query group. Empty string:
// acceptable (equal, or different only among near-tied scores). Otherwise the reason.
std::string CheckSelection(const std::vector<int64_t>& got, const std::vector<int64_t>& want, bool exact,
                           const float* q, int G, int dk, const ref::NsaBranchRows& rows, int64_t t, float scale,
                           const ref::NsaGeometry& g) {
  if (got == want) return "";
  std::ostringstream why;
  why << "selected blocks " << BlocksString(got) << ", reference " << BlocksString(want);
  const int64_t num_blocks = t / g.sel_block + 1;
  if (exact || got.size() != want.size() || num_blocks <= g.num_selected) return why.str();
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] < 0 || got[i] >= num_blocks || (i > 0 && got[i] <= got[i - 1])) return why.str() + " (not valid ids)";
  }
  std::vector<double> lse(G);
  const ref::RowRange cmp_range{0, g.NumCompressed(t)};
  std::vector<float> o(static_cast<size_t>(G) * 1);
  // lse only (dv = 1 reads column 0 of the values; the output is discarded).
  ref::AttendRanges(q, G, dk, 1, rows.kc, rows.vc, &cmp_range, 1, scale, o.data(), lse.data());
  const std::vector<double> scores = ref::BlockScores(q, G, dk, rows.kc, t, lse.data(), scale, g);
  auto forced = [&](int64_t j) {
    return j < g.forced_initial || (j <= t / g.sel_block && j > t / g.sel_block - g.forced_local);
  };
  for (int64_t j = 0; j < num_blocks; ++j) {
    if (forced(j) && !std::binary_search(got.begin(), got.end(), j)) return why.str() + " (a forced block missing)";
  }
  for (int64_t a : got) {
    if (std::binary_search(want.begin(), want.end(), a)) continue;
    for (int64_t b : want) {
      if (std::binary_search(got.begin(), got.end(), b)) continue;
      const double sa = scores[a], sb = scores[b];
      if (std::fabs(sa - sb) > kTieRelative * std::max(sa, sb) + 1e-9) {
        why << " (block " << a << " score " << sa << " chosen over block " << b << " score " << sb << ")";
        return why.str();
      }
    }
  }
  return "";
}

// How a decode case is launched: the single-kernel path (no workspace), or the split-KV path with
// automatic splits (kAutoSplits) or k chunks per split.
constexpr int kSingleKernel = -1;
constexpr int kAutoSplits = 0;

// Runs one case through the decode kernel (every sequence has len 1 and decode = true) or the
// prefill kernel, and checks every output element and the selected blocks. split_chunks picks the
// decode path; workspace_divisor > 1 hands the split path a workspace that much smaller than it asks
// for (it must cut coarser splits and stay correct).
// simple_prefill: run prefill through the simple kernel (NsaPrefillParams::simple).
void RunNsaCase(const NsaCase& c, bool decode, int split_chunks = kSingleKernel, int workspace_divisor = 1,
                bool simple_prefill = false) {
  SCOPED_TRACE("case " + c.name + (decode ? " (decode)" : simple_prefill ? " (simple prefill)" : " (prefill)") +
               " seed " + std::to_string(c.seed));
  std::mt19937_64 rng(c.seed);
  const int hkv = c.num_kv_heads, G = c.group, H = hkv * G, dk = c.dk, dv = c.dv;
  const int num_seqs = static_cast<int>(c.seqs.size());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dk)));
  const ref::NsaGeometry rg = RefGeometry(c.geo);
  const int ring_pages = (c.geo.window + c.page_rows - 1) / c.page_rows + 1;

  // Host data, bf16-exact.
  std::vector<HostSeq> seqs(num_seqs);
  std::vector<int32_t> cu{0}, start;
  int max_context = 1;
  for (int s = 0; s < num_seqs; ++s) {
    const SeqSpec& sp = c.seqs[s];
    if (decode) {
      ASSERT_EQ(sp.len, 1);
    }
    HostSeq& d = seqs[s];
    d.rows = sp.start + sp.len;
    d.cmp_rows = NumCompressed(c.geo, d.rows - 1);
    d.kc = gpu_test::RandomBf16Vector(hkv * d.cmp_rows * dk, -3.0f, 3.0f, rng);
    if (c.zero_cmp_keys) std::fill(d.kc.begin(), d.kc.end(), 0.0f);
    d.vc = gpu_test::RandomBf16Vector(hkv * d.cmp_rows * dv, -1.0f, 1.0f, rng);
    d.ks = gpu_test::RandomBf16Vector(hkv * d.rows * dk, -2.0f, 2.0f, rng);
    d.vs = gpu_test::RandomBf16Vector(hkv * d.rows * dv, -1.0f, 1.0f, rng);
    if (!c.shared_kv) {
      d.kw = gpu_test::RandomBf16Vector(hkv * d.rows * dk, -2.0f, 2.0f, rng);
      d.vw = gpu_test::RandomBf16Vector(hkv * d.rows * dv, -1.0f, 1.0f, rng);
    }
    cu.push_back(cu.back() + sp.len);
    start.push_back(sp.start);
    max_context = std::max<int>(max_context, d.rows);
  }
  const int num_tokens = cu.back();
  std::vector<float> q = gpu_test::RandomBf16Vector(static_cast<size_t>(num_tokens) * H * dk, -2.0f, 2.0f, rng);
  std::vector<float> gates(static_cast<size_t>(num_tokens) * H * 3);
  std::uniform_real_distribution<float> gate_dist(0.05f, 0.95f);
  for (float& x : gates) x = gate_dist(rng);
  if (c.gate_dtype == GateDType::kBf16) {
    for (float& x : gates) x = gpu_test::RoundToBf16(x);
  }
  // Decode: make the rows at the edges of the window (t - w just outside, t - w + 1 just inside) and
  // of the current selection block dominate the first head of each group (logit about +6), so an
  // off-by-one there moves the output far past the tolerance instead of by one row in hundreds.
  if (decode) {
    for (int s = 0; s < num_seqs; ++s) {
      HostSeq& d = seqs[s];
      const int64_t t = c.seqs[s].start, block_start = t / c.geo.sel_block * c.geo.sel_block;
      for (int h = 0; h < hkv; ++h) {
        const float* qh = q.data() + (static_cast<size_t>(s) * H + static_cast<size_t>(h) * G) * dk;
        double norm2 = 0;
        for (int i = 0; i < dk; ++i) norm2 += static_cast<double>(qh[i]) * qh[i];
        auto plant = [&](std::vector<float>& k, int64_t r) {
          if (r < 0 || r > t) return;
          for (int i = 0; i < dk; ++i) {
            k[(h * d.rows + r) * dk + i] = gpu_test::RoundToBf16(static_cast<float>(qh[i] * 6.0 / (scale * norm2)));
          }
        };
        std::vector<float>& kwin = c.shared_kv ? d.ks : d.kw;
        plant(kwin, t - c.geo.window);
        plant(kwin, t - c.geo.window + 1);
        plant(d.ks, t);
        plant(d.ks, block_start);
        plant(d.ks, block_start - 1);
      }
    }
  }

  // Device caches. Selection and compressed hold every row up to the last query; the window ring
  // holds rows < start for prefill (the chunk's rows come from the chunk buffers) and rows <= t for
  // decode.
  std::vector<const float*> kc, vc, ks, vs, kw, vw;
  std::vector<int64_t> rows, cmp_rows, win_written;
  for (int s = 0; s < num_seqs; ++s) {
    const HostSeq& d = seqs[s];
    kc.push_back(d.kc.data()), vc.push_back(d.vc.data()), ks.push_back(d.ks.data()), vs.push_back(d.vs.data());
    kw.push_back(d.kw.data()), vw.push_back(d.vw.data());
    rows.push_back(d.rows), cmp_rows.push_back(d.cmp_rows);
    win_written.push_back(decode ? d.rows : c.seqs[s].start);
  }
  DevicePagedCache cmp_cache, sel_cache, win_cache;
  ASSERT_NO_FATAL_FAILURE(BuildDevicePagedCache(kc, vc, cmp_rows, cmp_rows, hkv, dk, dv, c.cmp_page_rows, 0, rng, &cmp_cache));
  ASSERT_NO_FATAL_FAILURE(BuildDevicePagedCache(ks, vs, rows, rows, hkv, dk, dv, c.page_rows, 0, rng, &sel_cache));
  std::vector<float> win_k_chunk, win_v_chunk;
  if (!c.shared_kv) {
    ASSERT_NO_FATAL_FAILURE(BuildDevicePagedCache(kw, vw, rows, win_written, hkv, dk, dv, c.page_rows, ring_pages, rng, &win_cache));
    for (int s = 0; s < num_seqs; ++s) {
      for (int i = 0; i < c.seqs[s].len; ++i) {
        for (int h = 0; h < hkv; ++h) {
          const float* k = seqs[s].kw.data() + (h * seqs[s].rows + c.seqs[s].start + i) * dk;
          const float* v = seqs[s].vw.data() + (h * seqs[s].rows + c.seqs[s].start + i) * dv;
          win_k_chunk.insert(win_k_chunk.end(), k, k + dk);
          win_v_chunk.insert(win_v_chunk.end(), v, v + dv);
        }
      }
    }
  }

  DeviceArray<uint16_t> d_q, d_gates_bf16, d_out, d_wk, d_wv;
  DeviceArray<uint8_t> d_workspace;
  DeviceArray<float> d_gates_f32;
  DeviceArray<int32_t> d_cu, d_start, d_sel;
  NEEDLE_CUDA_ASSERT(d_q.Upload(gpu_test::ToBf16Bits(q)));
  const void* gates_ptr = nullptr;
  if (c.gate_dtype == GateDType::kBf16) {
    NEEDLE_CUDA_ASSERT(d_gates_bf16.Upload(gpu_test::ToBf16Bits(gates)));
    gates_ptr = d_gates_bf16.get();
  } else {
    NEEDLE_CUDA_ASSERT(d_gates_f32.Upload(gates));
    gates_ptr = d_gates_f32.get();
  }
  NEEDLE_CUDA_ASSERT(d_out.Allocate(static_cast<size_t>(num_tokens) * H * dv));
  NEEDLE_CUDA_ASSERT(d_out.Fill(0xFF));
  NEEDLE_CUDA_ASSERT(d_sel.Allocate(static_cast<size_t>(num_tokens) * hkv * c.geo.num_selected));
  NEEDLE_CUDA_ASSERT(d_sel.Fill(0x7F));
  NEEDLE_CUDA_ASSERT(d_cu.Upload(cu));
  NEEDLE_CUDA_ASSERT(d_start.Upload(start));
  // The window chunk buffers: two contiguous ones, or K and V interleaved in one padded row per token.
  const __nv_bfloat16* wk_ptr = nullptr;
  const __nv_bfloat16* wv_ptr = nullptr;
  int64_t chunk_stride = 0;
  if (c.chunk_pad < 0) {
    NEEDLE_CUDA_ASSERT(d_wk.Upload(gpu_test::ToBf16Bits(win_k_chunk)));
    NEEDLE_CUDA_ASSERT(d_wv.Upload(gpu_test::ToBf16Bits(win_v_chunk)));
    wk_ptr = reinterpret_cast<const __nv_bfloat16*>(d_wk.get());
    wv_ptr = reinterpret_cast<const __nv_bfloat16*>(d_wv.get());
  } else if (!c.shared_kv) {
    const int64_t pad = c.chunk_pad, kw = static_cast<int64_t>(hkv) * dk, vw = static_cast<int64_t>(hkv) * dv;
    chunk_stride = pad + kw + pad + vw + pad;
    std::vector<uint16_t> fused(static_cast<size_t>(num_tokens * chunk_stride), 0xFFFF);  // bf16 NaN
    const std::vector<uint16_t> kb = gpu_test::ToBf16Bits(win_k_chunk), vb = gpu_test::ToBf16Bits(win_v_chunk);
    for (int64_t t = 0; t < num_tokens; ++t) {
      std::copy_n(kb.begin() + t * kw, kw, fused.begin() + t * chunk_stride + pad);
      std::copy_n(vb.begin() + t * vw, vw, fused.begin() + t * chunk_stride + pad + kw + pad);
    }
    NEEDLE_CUDA_ASSERT(d_wk.Upload(fused));
    wk_ptr = reinterpret_cast<const __nv_bfloat16*>(d_wk.get()) + pad;
    wv_ptr = wk_ptr + kw + pad;
  }

  const auto* q_ptr = reinterpret_cast<const __nv_bfloat16*>(d_q.get());
  auto* out_ptr = reinterpret_cast<__nv_bfloat16*>(d_out.get());
  if (decode) {
    NsaDecodeParams p;
    p.q = q_ptr;
    p.gates = gates_ptr;
    p.gate_dtype = c.gate_dtype;
    p.out = out_ptr;
    p.selected_blocks = d_sel.get();
    p.positions = d_start.get();
    p.num_seqs = num_seqs;
    p.num_heads = H;
    p.num_kv_heads = hkv;
    p.head_dim_qk = dk;
    p.head_dim_v = dv;
    p.max_context = max_context;
    p.softmax_scale = scale;
    p.geometry = c.geo;
    p.compressed = cmp_cache.view;
    p.selection = sel_cache.view;
    p.window = win_cache.view;
    p.shared_kv = c.shared_kv;
    if (split_chunks == kSingleKernel) {
      ASSERT_EQ(NsaDecodeWorkspaceBytes(num_seqs, hkv, G, max_context), 0u);
      NEEDLE_CUDA_ASSERT(LaunchNsaDecode(p, nullptr, nullptr));
    } else {
      ASSERT_TRUE(NsaDecodeSplitKvSupported(dk, dv, G));
      p.chunks_per_split = split_chunks;
      p.cp_async_copies = c.cp_async;
      EXPECT_EQ(NsaDecodeSplitKvCopiesBoxes(p, /*compressed_branch=*/false), ExpectBoxes(c, false));
      EXPECT_EQ(NsaDecodeSplitKvCopiesBoxes(p, /*compressed_branch=*/true), ExpectBoxes(c, true));
      const size_t wanted = NsaDecodeSplitKvWorkspaceBytes(p);
      ASSERT_GT(wanted, 0u);
      const size_t bytes = wanted / workspace_divisor;
      // Garbage (NaN floats) in the workspace: the path needs no initialisation.
      NEEDLE_CUDA_ASSERT(d_workspace.Allocate(bytes));
      NEEDLE_CUDA_ASSERT(d_workspace.Fill(0xFF));
      NEEDLE_CUDA_ASSERT(LaunchNsaDecode(p, d_workspace.get(), bytes, nullptr));
      // The split path (not the single-kernel fallback) ran: it left partial states behind.
      std::vector<uint8_t> ws;
      NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
      NEEDLE_CUDA_ASSERT(d_workspace.Download(&ws));
      ASSERT_TRUE(std::any_of(ws.begin(), ws.end(), [](uint8_t b) { return b != 0xFF; }))
          << "the split-KV path did not run";
    }
  } else {
    NsaPrefillParams p;
    p.q = q_ptr;
    p.gates = gates_ptr;
    p.gate_dtype = c.gate_dtype;
    p.out = out_ptr;
    p.selected_blocks = d_sel.get();
    p.cu_tokens = d_cu.get();
    p.start_pos = d_start.get();
    p.num_seqs = num_seqs;
    p.num_tokens = num_tokens;
    p.num_heads = H;
    p.num_kv_heads = hkv;
    p.head_dim_qk = dk;
    p.head_dim_v = dv;
    p.max_context = max_context;
    p.softmax_scale = scale;
    p.geometry = c.geo;
    p.compressed = cmp_cache.view;
    p.selection = sel_cache.view;
    p.window = win_cache.view;
    p.window_k_chunk = c.shared_kv ? nullptr : wk_ptr;
    p.window_v_chunk = c.shared_kv ? nullptr : wv_ptr;
    p.window_k_chunk_stride = chunk_stride;
    p.window_v_chunk_stride = chunk_stride;
    p.shared_kv = c.shared_kv;
    p.simple = simple_prefill;
    ASSERT_EQ(NsaPrefillWorkspaceBytes(num_tokens, hkv, G, max_context), 0u);
    if (simple_prefill) {
      ASSERT_FALSE(NsaPrefillUsesTensorCores(p));
    } else if (c.tensor_cores) {
      ASSERT_TRUE(NsaPrefillUsesTensorCores(p));
    }
    NEEDLE_CUDA_ASSERT(LaunchNsaPrefill(p, nullptr, nullptr));
  }
  NEEDLE_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<uint16_t> out_bits;
  std::vector<int32_t> sel;
  NEEDLE_CUDA_ASSERT(d_out.Download(&out_bits));
  NEEDLE_CUDA_ASSERT(d_sel.Download(&sel));
  const std::vector<float> out = gpu_test::FromBf16Bits(out_bits);

  // Reference, one (query token, KV group) at a time, spread over std::threads (long contexts make
  // the CPU reference the slow part); the first failure of each item is reported in item order.
  struct Item {
    int s, i, h;
  };
  std::vector<Item> items;
  for (int s = 0; s < num_seqs; ++s) {
    for (int i = 0; i < c.seqs[s].len; ++i) {
      for (int h = 0; h < hkv; ++h) items.push_back({s, i, h});
    }
  }
  const std::string failure = gpu_test::ParallelCheck(items.size(), [&](size_t n) -> std::string {
    std::vector<float> expected(static_cast<size_t>(G) * dv);
    const int s = items[n].s, i = items[n].i, h = items[n].h;
    const HostSeq& d = seqs[s];
    const int token = cu[s] + i;
    const int64_t t = c.seqs[s].start + i;
    ref::NsaBranchRows r;
    r.kc = ref::KvRows::Contiguous(d.kc.data() + h * d.cmp_rows * dk, dk);
    r.vc = ref::KvRows::Contiguous(d.vc.data() + h * d.cmp_rows * dv, dv);
    r.ks = ref::KvRows::Contiguous(d.ks.data() + h * d.rows * dk, dk);
    r.vs = ref::KvRows::Contiguous(d.vs.data() + h * d.rows * dv, dv);
    r.kw = c.shared_kv ? r.ks : ref::KvRows::Contiguous(d.kw.data() + h * d.rows * dk, dk);
    r.vw = c.shared_kv ? r.vs : ref::KvRows::Contiguous(d.vw.data() + h * d.rows * dv, dv);
    const size_t head0 = static_cast<size_t>(token) * H + static_cast<size_t>(h) * G;
    const float* qg = q.data() + head0 * dk;
    const float* gg = gates.data() + head0 * 3;
    std::vector<int64_t> want;
    ref::NsaAttention(qg, gg, G, dk, dv, r, t, scale, rg, expected.data(), &want);
    const int32_t* sg = sel.data() + (static_cast<size_t>(token) * hkv + h) * c.geo.num_selected;
    std::vector<int64_t> got;
    bool padding_ok = true;
    for (int k = 0; k < c.geo.num_selected; ++k) {
      if (sg[k] >= 0) {
        if (!padding_ok) got.push_back(-2);  // an id after a -1: invalid
        got.push_back(sg[k]);
      } else {
        padding_ok = false;
      }
    }
    std::ostringstream where;
    where << "seed " << c.seed << " case " << c.name << " token " << token << " (sequence " << s << ", position " << t
          << ") KV head " << h;
    const std::string sel_error = CheckSelection(got, want, c.zero_cmp_keys, qg, G, dk, r, t, scale, rg);
    if (!sel_error.empty()) return where.str() + ": " + sel_error;
    if (got != want) RefNsaWithBlocks(qg, gg, G, dk, dv, r, t, scale, rg, got, expected.data());
    const ::testing::AssertionResult ok = gpu_test::AllClose(out.data() + head0 * dv, expected.data(), expected.size(),
                                                             kAtol, kRtol, where.str() + ", output [G][d_v] of the group");
    if (!ok) return ok.message();
    return "";
  });
  ASSERT_TRUE(failure.empty()) << failure;
}

// ---- Decode ----------------------------------------------------------------------------------

// Positions at the paper geometry's boundaries: l-2, l-1, l-1+d, multiples of l' and around them,
// past n*l' = 1024 (where top-n actually drops blocks) and past the 512-token window.
const std::vector<int> kPaperPositions = {0,   1,   30,  31,   32,   46,   47,   63,   64,  127,
                                          128, 511, 512, 513, 1023, 1024, 1087, 1088, 1500, 2047};
const std::vector<int> kFlaPositions = {0, 62, 63, 64, 127, 128, 511, 512, 1023, 1024, 1100, 2047, 3000};

TEST(NsaDecodeGpuTest, PaperGeometry) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<NsaCase> cases = {
      {"paper d192/128 G16 ring", PaperGeometry(), 192, 128, 2, 16, false, DecodeAt(kPaperPositions)},
      {"paper d192/192 G8 ring", PaperGeometry(), 192, 192, 2, 8, false, DecodeAt(kPaperPositions)},
      {"paper d128 G4 shared fp32-gates", PaperGeometry(), 128, 128, 2, 4, true, DecodeAt(kPaperPositions), 64, 64,
       GateDType::kFp32},
      {"paper d64 G1 ring", PaperGeometry(), 64, 64, 4, 1, false, DecodeAt(kPaperPositions)},
      {"paper d192/128 G32 shared", PaperGeometry(), 192, 128, 1, 32, true, DecodeAt({0, 31, 47, 64, 1087, 3001, 4095})},
      {"paper d128 G3 ring pages128 cmp-pages32", PaperGeometry(), 128, 128, 2, 3, false,
       DecodeAt({0, 47, 127, 128, 1024, 2000, 2500}), 128, 32},
      {"demo d32 G4 ring", PaperGeometry(), 32, 32, 2, 4, false, DecodeAt(kPaperPositions)},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 100 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true));
  }
}

TEST(NsaDecodeGpuTest, FlaGeometry) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<NsaCase> cases = {
      {"fla forced 0/current/previous d64 G16 shared", FlaGeometry(1, 2), 64, 64, 4, 16, true,
       DecodeAt(kFlaPositions)},
      {"fla forced current d64 G32 ring", FlaGeometry(0, 1), 64, 64, 2, 32, false, DecodeAt(kFlaPositions)},
      {"fla no forced d128 G4 shared", FlaGeometry(0, 0), 128, 128, 2, 4, true, DecodeAt(kFlaPositions)},
      {"fla forced 0/current/previous d192/128 G1 ring", FlaGeometry(1, 2), 192, 128, 3, 1, false,
       DecodeAt(kFlaPositions)},
      {"fla d64 G64 shared fp32-gates", FlaGeometry(1, 2), 64, 64, 1, 64, true, DecodeAt({0, 63, 64, 1100, 2047}), 64,
       64, GateDType::kFp32},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 200 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true));
  }
}

// The tiny test models' geometries (engine/presets.cc): small blocks, small windows, small pages.
TEST(NsaDecodeGpuTest, TinyModels) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const NsaKernelGeometry tiny_nsa{16, 16, 16, 4, 1, 2, 32};
  const NsaKernelGeometry tiny_llama_nsa{16, 16, 16, 3, 0, 1, 32};
  const NsaKernelGeometry tiny_paper{8, 4, 16, 4, 1, 2, 32};
  const std::vector<int> small = {0, 6, 7, 11, 14, 15, 16, 31, 32, 33, 47, 63, 64, 100, 250, 301};
  const std::vector<NsaCase> cases = {
      {"tiny-nsa d64 G16 shared", tiny_nsa, 64, 64, 1, 16, true, DecodeAt(small), 16, 16},
      {"tiny-llama-nsa d16 G2 shared", tiny_llama_nsa, 16, 16, 2, 2, true, DecodeAt(small), 16, 16},
      {"tiny-nsa-paper d24/16 G2 ring", tiny_paper, 24, 16, 2, 2, false, DecodeAt(small), 16, 8},
      {"tiny-nsa-paper d24/16 G4 ring pages32", tiny_paper, 24, 16, 1, 4, false, DecodeAt(small), 32, 16},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 300 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true));
  }
}

// All compressed keys zero: every compressed probability is equal, interior block scores tie
// exactly, and the top-n must take the lowest block indices.
TEST(NsaDecodeGpuTest, TiesGoToLowerBlockIndex) {
  NEEDLE_SKIP_WITHOUT_GPU();
  std::vector<NsaCase> cases = {
      {"ties paper d128 G4", PaperGeometry(), 128, 128, 2, 4, true, DecodeAt({1100, 2047, 3000})},
      {"ties fla d64 G16", FlaGeometry(1, 2), 64, 64, 1, 16, false, DecodeAt({1100, 2047})},
      {"ties fla no forced d64 G1", FlaGeometry(0, 0), 64, 64, 1, 1, true, DecodeAt({1100, 2047})},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    cases[i].zero_cmp_keys = true;
    cases[i].seed = 400 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(cases[i], /*decode=*/true));
  }
}

// fla-org's chunked top-k merge (llama-nsa checkpoints whose n exceeds C/2, C = block_size): block
// size 16 with 16 slots (zen-E/NSA-1B's shape) and block 64 with 48 slots, at positions before the
// first full chunk (exact top-n), at chunk boundaries and deep into later chunks.
NsaKernelGeometry ChunkedMerge16() { return {16, 16, 16, 16, 0, 1, 64, 16}; }
NsaKernelGeometry ChunkedMerge64() { return {64, 64, 64, 48, 1, 2, 512, 64}; }
const std::vector<int> kChunked16Positions = {200, 255, 256, 257, 300, 511, 512, 700, 1023, 2047, 2100, 4095};
const std::vector<int> kChunked64Positions = {4095, 4096, 4200, 6000, 8191, 8192, 9000};

std::vector<NsaCase> ChunkedMergeCases() {
  return {
      {"chunked C16 n16 d64 G8 shared", ChunkedMerge16(), 64, 64, 2, 8, true, DecodeAt(kChunked16Positions), 16, 16},
      {"chunked C16 n16 d64 G16 shared pages64", ChunkedMerge16(), 64, 64, 1, 16, true,
       DecodeAt(kChunked16Positions), 64, 16},
      {"chunked C64 n48 d64 G16 shared", ChunkedMerge64(), 64, 64, 1, 16, true, DecodeAt(kChunked64Positions)},
      {"chunked C64 n48 d192/128 G4 ring", ChunkedMerge64(), 192, 128, 2, 4, false, DecodeAt(kChunked64Positions)},
  };
}

TEST(NsaDecodeGpuTest, ChunkedTopkMerge) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<NsaCase> cases = ChunkedMergeCases();
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 2100 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true));
  }
}

// Long contexts, one sequence each (few, they dominate the runtime).
TEST(NsaDecodeGpuTest, LongContext) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<NsaCase> cases = {
      {"paper d192/128 G16 ring 64k", PaperGeometry(), 192, 128, 1, 16, false, DecodeAt({65535})},
      {"fla d64 G16 shared 64k", FlaGeometry(1, 2), 64, 64, 1, 16, true, DecodeAt({65535})},
      {"paper d128 G4 ring 16k+32k", PaperGeometry(), 128, 128, 1, 4, false, DecodeAt({16383, 32768})},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 500 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true));
  }
}

// ---- Decode, split-KV path ------------------------------------------------------------------------
//
// The same cases and checks through the four split kernels, with automatic splits and with one chunk
// (64 rows) per split, which spreads even short contexts over many thread blocks, many of them empty
// for the shorter sequences of a batch.

std::vector<NsaCase> SplitKvCases() {
  const NsaKernelGeometry tiny_paper{8, 4, 16, 4, 1, 2, 32};
  const NsaKernelGeometry tiny_llama_nsa{16, 16, 16, 3, 0, 1, 32};
  return {
      {"paper d192/128 G16 ring", PaperGeometry(), 192, 128, 2, 16, false, DecodeAt(kPaperPositions)},
      {"paper d192/128 G16 shared fp32-gates pages128 cmp-pages32", PaperGeometry(), 192, 128, 2, 16, true,
       DecodeAt(kPaperPositions), 128, 32, GateDType::kFp32},
      {"paper d64 G1 ring", PaperGeometry(), 64, 64, 3, 1, false, DecodeAt(kPaperPositions)},
      {"paper d192/128 G3 ring pages16", PaperGeometry(), 192, 128, 2, 3, false, DecodeAt({0, 47, 127, 1024, 2000}),
       16, 16},
      {"fla d64 G16 shared", FlaGeometry(1, 2), 64, 64, 4, 16, true, DecodeAt(kFlaPositions)},
      {"fla forced current d64 G4 ring", FlaGeometry(0, 1), 64, 64, 2, 4, false, DecodeAt(kFlaPositions)},
      {"fla no forced d192/128 G16 shared", FlaGeometry(0, 0), 192, 128, 2, 16, true, DecodeAt(kFlaPositions)},
      {"tiny-nsa-paper geometry d64 G16 ring pages32", tiny_paper, 64, 64, 2, 16, false,
       DecodeAt({0, 6, 7, 11, 15, 16, 31, 33, 63, 64, 100, 250, 301}), 32, 16},
      {"tiny-llama-nsa geometry d64 G8 shared pages16", tiny_llama_nsa, 64, 64, 1, 8, true,
       DecodeAt({0, 15, 16, 47, 48, 100, 301}), 16, 16},
  };
}

TEST(NsaDecodeSplitKvGpuTest, AutomaticSplits) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<NsaCase> cases = SplitKvCases();
  for (size_t i = 0; i < cases.size(); ++i) {
    for (bool cp_async : {false, true}) {  // tensor-map boxes where the chunks allow them, and cp.async
      NsaCase c = cases[i];
      c.cp_async = cp_async;
      c.seed = 1100 + i + (cp_async ? 50 : 0);
      ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, kAutoSplits));
    }
  }
}

TEST(NsaDecodeSplitKvGpuTest, OneChunkPerSplit) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<NsaCase> cases = SplitKvCases();
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 1200 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, 1));
  }
}

TEST(NsaDecodeSplitKvGpuTest, SplitCountsAndSmallWorkspace) {
  NEEDLE_SKIP_WITHOUT_GPU();
  NsaCase c{"paper d192/128 G16 ring", PaperGeometry(), 192, 128, 2, 16, false, DecodeAt({1087, 3001, 4095, 200})};
  for (int cps : {2, 3, 7}) {
    c.seed = 1300 + cps;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, cps));
  }
  c.seed = 1310;
  ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, 1, /*workspace_divisor=*/3));
}

// G > 16: two and four 16-row head tiles per KV group (48 pads to 64).
TEST(NsaDecodeSplitKvGpuTest, LargeGroups) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<NsaCase> cases = {
      {"paper d192/128 G32 shared", PaperGeometry(), 192, 128, 1, 32, true, DecodeAt({0, 31, 47, 64, 1087, 3001})},
      {"fla d64 G64 shared fp32-gates", FlaGeometry(1, 2), 64, 64, 1, 64, true, DecodeAt({0, 63, 64, 1100, 2047}),
       64, 64, GateDType::kFp32},
      {"paper d64 G48 ring", PaperGeometry(), 64, 64, 1, 48, false, DecodeAt({5, 513, 1500, 2047})},
      {"paper d192/128 G64 ring", PaperGeometry(), 192, 128, 1, 64, false, DecodeAt({1023, 1500})},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 1400 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, kAutoSplits));
    c.seed += 50;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, 1));
  }
}

// Selected blocks in pages shorter than a block (8 and 32 rows: 8 and 2 pages per block) and longer
// (128 rows: two blocks per page).
TEST(NsaDecodeSplitKvGpuTest, SelectionPageSizes) {
  NEEDLE_SKIP_WITHOUT_GPU();
  for (int page_rows : {8, 32, 128}) {
    NsaCase c{"paper d64 G16 ring pages" + std::to_string(page_rows), PaperGeometry(), 64, 64, 2, 16, false,
              DecodeAt({1087, 3000, 9000}), page_rows, 32};
    c.seed = 1800 + page_rows;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, kAutoSplits));
  }
}

TEST(NsaDecodeSplitKvGpuTest, TiesGoToLowerBlockIndex) {
  NEEDLE_SKIP_WITHOUT_GPU();
  std::vector<NsaCase> cases = {
      {"ties paper d192/128 G16", PaperGeometry(), 192, 128, 2, 16, true, DecodeAt({1100, 2047, 3000})},
      {"ties fla d64 G16", FlaGeometry(1, 2), 64, 64, 1, 16, false, DecodeAt({1100, 2047})},
      {"ties fla no forced d64 G1", FlaGeometry(0, 0), 64, 64, 1, 1, true, DecodeAt({1100, 2047})},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    cases[i].zero_cmp_keys = true;
    cases[i].seed = 1500 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(cases[i], /*decode=*/true, 1));
  }
}

TEST(NsaDecodeSplitKvGpuTest, ChunkedTopkMerge) {
  NEEDLE_SKIP_WITHOUT_GPU();
  std::vector<NsaCase> cases = ChunkedMergeCases();
  cases.push_back({"chunked C16 n16 d64 G16 shared 64k", ChunkedMerge16(), 64, 64, 1, 16, true,
                   DecodeAt({65535, 300}), 16, 16});
  cases.push_back({"chunked ties C16 n16 d64 G8", ChunkedMerge16(), 64, 64, 1, 8, true, DecodeAt({700, 2047}), 16, 16});
  cases.back().zero_cmp_keys = true;
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 2200 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, kAutoSplits));
    c.seed += 50;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, 1));
  }
}

// 64k and 128k contexts, and a batch mixing long and short sequences; 16-token blocks at 40k and 33k
// positions (2,500 blocks to choose from), and n = 24 (past the select kernel's threshold top-n, which
// takes n <= 16: the radix select).
TEST(NsaDecodeSplitKvGpuTest, LongContext) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const NsaKernelGeometry small_blocks{8, 4, 16, 4, 1, 2, 32};
  const NsaKernelGeometry n24{8, 4, 16, 24, 1, 2, 32};
  const std::vector<NsaCase> cases = {
      {"small blocks d64 G8 ring 40k+33k", small_blocks, 64, 64, 1, 8, false, DecodeAt({40000, 33000}),
       32, 16},
      {"n 24 d64 G16 shared (radix top-n)", n24, 64, 64, 2, 16, true, DecodeAt({1000, 390, 383}), 32, 16},
      {"paper d192/128 G16 ring 64k", PaperGeometry(), 192, 128, 1, 16, false, DecodeAt({65535})},
      {"paper d192/128 G16 ring 128k", PaperGeometry(), 192, 128, 1, 16, false, DecodeAt({131071})},
      {"fla d64 G16 shared 128k+1k", FlaGeometry(1, 2), 64, 64, 1, 16, true, DecodeAt({131071, 1000})},
      {"paper d64 G4 shared 64k+16k+5", PaperGeometry(), 64, 64, 2, 4, true, DecodeAt({65535, 16383, 5})},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 1600 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, kAutoSplits));
  }
}

TEST(NsaDecodeSplitKvGpuTest, Batch) {
  NEEDLE_SKIP_WITHOUT_GPU();
  std::vector<int> positions;
  for (int s = 0; s < 24; ++s) positions.push_back(s * 331 % 6000);
  NsaCase c{"paper d192/128 G16 ring batch 24", PaperGeometry(), 192, 128, 2, 16, false, DecodeAt(positions)};
  c.seed = 1700;
  ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, kAutoSplits));
}

// Enough (sequence, KV head) pairs that each has one split per branch, so the merge kernel takes
// several query heads per thread block (8 at d_v 128, 16 at d_v 64); the Batch case above has more
// splits per pair: 2 heads per block, their slots spread over four thread groups.
TEST(NsaDecodeSplitKvGpuTest, MergeSeveralHeadsPerBlock) {
  NEEDLE_SKIP_WITHOUT_GPU();
  std::vector<int> positions;
  for (int s = 0; s < 40; ++s) positions.push_back(200 + s * 97 % 2500);
  const std::vector<NsaCase> cases = {
      {"paper d192/128 G16 ring 40 x 4 KV heads", PaperGeometry(), 192, 128, 4, 16, false, DecodeAt(positions)},
      {"fla d64 G16 shared 40 x 4 KV heads", FlaGeometry(1, 2), 64, 64, 4, 16, true, DecodeAt(positions)},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 1750 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/true, kAutoSplits));
  }
}

// ---- Prefill ---------------------------------------------------------------------------------

TEST(NsaPrefillGpuTest, Chunks) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const NsaKernelGeometry tiny_paper{8, 4, 16, 4, 1, 2, 32};
  const NsaKernelGeometry tiny_llama_nsa{16, 16, 16, 3, 0, 1, 32};
  const std::vector<NsaCase> cases = {
      {"paper d192/128 G16 ring", PaperGeometry(), 192, 128, 1, 16, false, {{0, 40}, {1500, 1}, {3000, 24}}},
      // (500, 600): a chunk longer than the window ring (9 pages of 64 = 576 rows).
      {"paper d64 G1 ring long chunk", PaperGeometry(), 64, 64, 1, 1, false, {{500, 600}}},
      {"paper d128 G4 shared", PaperGeometry(), 128, 128, 2, 4, true, {{0, 70}, {1000, 60}}},
      {"fla d64 G16 shared", FlaGeometry(1, 2), 64, 64, 2, 16, true, {{0, 130}, {1000, 70}}},
      {"fla current d64 G32 ring", FlaGeometry(0, 1), 64, 64, 1, 32, false, {{990, 70}, {0, 1}}},
      // Ring of 3 pages of 16 rows = 48 < 50.
      {"tiny-nsa-paper d24/16 G2 ring", tiny_paper, 24, 16, 2, 2, false, {{0, 40}, {30, 50}, {200, 17}}, 16, 8},
      {"tiny-llama-nsa d16 G2 shared", tiny_llama_nsa, 16, 16, 2, 2, true, {{0, 70}, {64, 64}}, 16, 16},
      {"demo d32 G4 ring fp32-gates", PaperGeometry(), 32, 32, 2, 4, false, {{1000, 80}}, 64, 64, GateDType::kFp32},
      {"chunked C16 n16 d64 G8 shared", ChunkedMerge16(), 64, 64, 1, 8, true, {{250, 20}, {1000, 70}}, 16, 16},
      {"chunked C64 n48 d192/192 G4 ring", ChunkedMerge64(), 192, 192, 1, 4, false, {{4090, 40}}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 600 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/false));
  }
}

// The same chunks through the simple kernel (NsaPrefillParams::simple), which the tensor-core path
// replaced for 192/128, 128/128 and 64/64.
TEST(NsaPrefillGpuTest, SimpleKernel) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<NsaCase> cases = {
      {"paper d192/128 G16 ring", PaperGeometry(), 192, 128, 1, 16, false, {{0, 40}, {1500, 1}, {3000, 24}}},
      {"fla d64 G16 shared", FlaGeometry(1, 2), 64, 64, 2, 16, true, {{0, 130}, {1000, 70}}},
      {"chunked C16 n16 d64 G8 shared", ChunkedMerge16(), 64, 64, 1, 8, true, {{250, 20}, {1000, 70}}, 16, 16},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 650 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/false, kSingleKernel, 1, /*simple_prefill=*/true));
  }
}

// The tensor-core prefill path (kernels/nsa_prefill_tc.cuh: d_k/d_v 192/128, 128/128, 64/64): chunks
// from position 0 and mid-sequence, a chunk longer than the window ring, ragged batches, G up to 64,
// the chunked top-k merge, ties, and the simple kernel's head dims next to it (16/16, 24/16, 32/32).
TEST(NsaPrefillGpuTest, TensorCore) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const NsaKernelGeometry tiny_paper{8, 4, 16, 4, 1, 2, 32};
  const NsaKernelGeometry tiny_llama_nsa{16, 16, 16, 3, 0, 1, 32};
  std::vector<NsaCase> cases = {
      {"paper d192/128 G16 ring 0+300, 1500+600", PaperGeometry(), 192, 128, 2, 16, false, {{0, 300}, {1500, 600}}},
      {"paper d192/128 G16 shared 4090+40, 1030+5", PaperGeometry(), 192, 128, 2, 16, true, {{4090, 40}, {1030, 5}}},
      {"paper d192/128 G16 ring pages128 cmp-pages32 fp32-gates", PaperGeometry(), 192, 128, 1, 16, false,
       {{1000, 100}, {0, 3}, {2047, 2}}, 128, 32, GateDType::kFp32},
      {"paper d192/128 G64 ring", PaperGeometry(), 192, 128, 1, 64, false, {{1020, 12}, {0, 5}}},
      {"paper d128 G4 shared ragged", PaperGeometry(), 128, 128, 2, 4, true, {{0, 1}, {63, 66}, {1087, 2}, {2500, 33}}},
      {"paper d64 G3 ring pages16", PaperGeometry(), 64, 64, 2, 3, false, {{200, 70}, {1100, 30}}, 16, 16},
      {"fla d64 G16 shared 0+200, 1500+600", FlaGeometry(1, 2), 64, 64, 2, 16, true, {{0, 200}, {1500, 600}}},
      {"fla forced current d64 G32 ring", FlaGeometry(0, 1), 64, 64, 1, 32, false, {{990, 70}, {4090, 40}}},
      {"fla no forced d64 G48 shared", FlaGeometry(0, 0), 64, 64, 1, 48, true, {{1100, 20}}},
      {"chunked C16 n16 d64 G8 shared", ChunkedMerge16(), 64, 64, 2, 8, true, {{0, 300}, {1000, 70}, {4090, 40}},
       16, 16},
      {"chunked C64 n48 d192/128 G4 ring", ChunkedMerge64(), 192, 128, 1, 4, false, {{4090, 40}, {8190, 4}}},
      {"tiny-nsa-paper geometry d64 G16 ring pages32", tiny_paper, 64, 64, 1, 16, false, {{0, 40}, {30, 50}, {200, 17}},
       32, 16},
      {"tiny-llama-nsa geometry d64 G8 shared pages16", tiny_llama_nsa, 64, 64, 2, 8, true, {{0, 70}, {64, 64}}, 16, 16},
      {"simple kernel d16 G2 shared", tiny_llama_nsa, 16, 16, 1, 2, true, {{0, 40}, {100, 30}}, 16, 16},
      {"simple kernel d24/16 G2 ring", tiny_paper, 24, 16, 1, 2, false, {{0, 40}, {30, 50}}, 16, 8},
      {"simple kernel d32 G4 ring", PaperGeometry(), 32, 32, 1, 4, false, {{1000, 30}}},
  };
  cases.push_back({"ties paper d192/128 G16", PaperGeometry(), 192, 128, 1, 16, true, {{1100, 10}, {3000, 5}}});
  cases.back().zero_cmp_keys = true;
  cases.push_back({"ties chunked C16 n16 d64 G8", ChunkedMerge16(), 64, 64, 1, 8, true, {{700, 10}, {2047, 3}}, 16, 16});
  cases.back().zero_cmp_keys = true;
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.seed = 700 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/false));
  }
}

// Window chunk rows inside wider rows (NsaPrefillParams::window_{k,v}_chunk_stride), laid out as the
// CUDA executor's fused projection output: K and V of a token in one row with NaN padding around
// them. Pads of 8 keep the rows 16-byte aligned (the tensor-core path); pads of 3 do not, and
// 192/128 then falls back to the simple kernel, which must read the same rows. Both kernels, chunks
// longer than the ring, ragged batches.
TEST(NsaPrefillGpuTest, StridedWindowChunks) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const NsaKernelGeometry tiny_paper{8, 4, 16, 4, 1, 2, 32};
  struct Strided {
    NsaCase c;
    int pad;
    bool simple;
  };
  const std::vector<Strided> cases = {
      {{"paper d192/128 G16 ring", PaperGeometry(), 192, 128, 2, 16, false, {{0, 300}, {1500, 600}}}, 8, false},
      {{"paper d192/128 G16 ring unpadded", PaperGeometry(), 192, 128, 1, 16, false, {{0, 40}, {3000, 24}}}, 0, false},
      {{"paper d192/128 G16 ring misaligned", PaperGeometry(), 192, 128, 2, 16, false, {{1000, 100}, {0, 3}}}, 3,
       false},
      {{"paper d64 G1 ring long chunk", PaperGeometry(), 64, 64, 1, 1, false, {{500, 600}}}, 8, false},
      {{"paper d128 G4 ring simple", PaperGeometry(), 128, 128, 2, 4, false, {{0, 70}, {1000, 60}}}, 8, true},
      {{"tiny-nsa-paper d24/16 G2 ring", tiny_paper, 24, 16, 2, 2, false, {{0, 40}, {30, 50}, {200, 17}}, 16, 8}, 8,
       false},
      {{"demo d32 G4 ring fp32-gates", PaperGeometry(), 32, 32, 2, 4, false, {{1000, 80}}, 64, 64, GateDType::kFp32},
       5, false},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i].c;
    c.chunk_pad = cases[i].pad;
    c.name += " pad " + std::to_string(cases[i].pad);
    c.seed = 850 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/false, kSingleKernel, 1, cases[i].simple));
  }
}

// Long contexts: a 512-token chunk at position 60000 (paper ring, FLA shared), a 64k chunk tail.
// Long contexts; past ~96k positions at the paper geometry (~180k at FLA's) the G x blocks masses no
// longer fit in shared memory and the compressed branch runs in two passes, still on tensor cores.
TEST(NsaPrefillGpuTest, TensorCoreLongContext) {
  NEEDLE_SKIP_WITHOUT_GPU();
  const std::vector<NsaCase> cases = {
      {"paper d192/128 G16 ring 60000+512", PaperGeometry(), 192, 128, 1, 16, false, {{60000, 512}}},
      {"fla d64 G16 shared 60000+512, 5+100", FlaGeometry(1, 2), 64, 64, 1, 16, true, {{60000, 512}, {5, 100}}},
      {"chunked C16 n16 d64 G8 shared 30000+256", ChunkedMerge16(), 64, 64, 1, 8, true, {{30000, 256}}, 16, 16},
      {"paper d192/128 G16 ring 120000+24, 3000+8 (two passes)", PaperGeometry(), 192, 128, 1, 16, false,
       {{120000, 24}, {3000, 8}}},
      {"fla d64 G16 shared 200000+16 (two passes)", FlaGeometry(1, 2), 64, 64, 1, 16, true, {{200000, 16}}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    NsaCase c = cases[i];
    c.tensor_cores = true;
    c.seed = 800 + i;
    ASSERT_NO_FATAL_FAILURE(RunNsaCase(c, /*decode=*/false));
  }
}

// The decode launcher refuses what it cannot run, without launching.
TEST(NsaDecodeGpuTest, RejectsUnsupportedParams) {
  EXPECT_TRUE(NsaDecodeSupported(192, 128, 16));
  EXPECT_TRUE(NsaDecodeSupported(24, 16, 2));
  EXPECT_FALSE(NsaDecodeSupported(96, 96, 4));
  EXPECT_FALSE(NsaDecodeSupported(64, 64, 65));
  EXPECT_FALSE(NsaPrefillSupported(64, 64, 0));
  NsaDecodeParams p;  // all null
  p.num_seqs = 1;
  p.num_heads = 4;
  p.num_kv_heads = 1;
  p.head_dim_qk = 96;
  p.head_dim_v = 96;
  EXPECT_EQ(LaunchNsaDecode(p, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchNsaDecode(p, nullptr, 0, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(NsaDecodeSplitKvWorkspaceBytes(p), 0u);
  EXPECT_TRUE(NsaDecodeSplitKvSupported(192, 128, 16));
  EXPECT_TRUE(NsaDecodeSplitKvSupported(64, 64, 64));
  EXPECT_FALSE(NsaDecodeSplitKvSupported(24, 16, 2));
  EXPECT_FALSE(NsaDecodeSplitKvSupported(64, 64, 65));
}

}  // namespace
}  // namespace needle::kernels
