// NSA decode attention: one query token per sequence, a batch of sequences with their own positions,
// all three branches (compressed, selected, window) and the gated sum, reading paged caches. The
// semantics are kernels/reference/attention_ref.h's NsaAttention (see shared docs nsa-inference.md
// sections 1, 2 and 5); this header declares the params and the launcher and compiles with g++. It
// also holds the pieces the NSA prefill kernel shares (NsaKernelGeometry, GateDType).
//
// Contract: before the launch, every cache already holds the rows the step reads: the selection
// cache rows 0..t (the query's own K/V included), the compressed cache rows 0..N_c(t)-1 (including a
// compressed token that position t completes), and, with independent window K/V, the window ring
// row t. The kernel writes nothing but `out` and `selected_blocks`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/paged_kv.h"

namespace needle::kernels {

// The NSA geometry (mirrors engine::NsaParams / reference::NsaGeometry).
struct NsaKernelGeometry {
  int cmp_block = 32;      // l: raw tokens per compressed token
  int cmp_stride = 16;     // d: distance between consecutive compressed tokens' starts
  int sel_block = 64;      // l': tokens per selection block
  int num_selected = 16;   // n: blocks selected per query and KV group, forced blocks included
  int forced_initial = 1;  // blocks 0..forced_initial-1 always selected
  int forced_local = 2;    // the forced_local most recent blocks always selected
  int window = 512;        // w: window keys, the query included; 0 disables the window branch
  // 0: exact top-n. C > 0 (llama-nsa, fla-org's Triton top-k): when n > C/2 and the current block is
  // at least C, only the best C/2 blocks before the current block's chunk of C and the best C/2 of
  // that chunk compete for the n slots (reference::SelectBlocks).
  int topk_merge_chunk = 0;
};

enum class GateDType : int32_t { kBf16 = 0, kFp32 = 1 };

struct NsaDecodeParams {
  // [num_seqs][num_heads][head_dim_qk] bf16: the queries, post-RoPE. Head h uses KV head h / G.
  const __nv_bfloat16* q = nullptr;
  // [num_seqs][num_heads][3] (cmp, slc, win), already sigmoided; bf16 or fp32 per gate_dtype.
  const void* gates = nullptr;
  GateDType gate_dtype = GateDType::kBf16;
  // [num_seqs][num_heads][head_dim_v] bf16: the gated sum of the three branches.
  __nv_bfloat16* out = nullptr;
  // Optional (nullptr: not written). [num_seqs][num_kv_heads][num_selected] int32: the selected
  // block ids of each KV group in ascending order, -1 in unused slots.
  int32_t* selected_blocks = nullptr;
  // [num_seqs] int32: t, the position of each sequence's query token (it sees tokens 0..t).
  const int32_t* positions = nullptr;

  int num_seqs = 0;
  int num_heads = 0;     // H
  int num_kv_heads = 0;  // Hkv; G = H / Hkv must be in 1..64
  int head_dim_qk = 0;   // d_k
  int head_dim_v = 0;    // d_v
  // An upper bound on positions[b] + 1 over the batch; sizes per-block scratch (block scores). A
  // query beyond it gets NaN outputs instead of being computed.
  int max_context = 0;
  float softmax_scale = 0.0f;  // 1 / sqrt(d_k)
  NsaKernelGeometry geometry;

  // Rows are compressed tokens 0..N_c(t)-1 (K_cmp, V_cmp).
  PagedKvCache compressed;
  // Rows are positions: raw post-RoPE K/V of the selection branch (all branches when shared_kv).
  PagedKvCache selection;
  // Rows are positions, a ring of pages (ring_pages > 0). Ignored when shared_kv.
  PagedKvCache window;
  // true: the window branch reads the selection cache (shared branch K/V, FLA `nsa`/`llama-nsa`).
  bool shared_kv = true;
  // Split-KV path only: 0 picks the chunks (64 rows each) per thread block from the batch shape and
  // the device; k > 0 makes every split k chunks (tests and tuning).
  int chunks_per_split = 0;
  // Split-KV path only: copy K/V chunks with 16-byte cp.async even where tensor-map boxes apply
  // (NsaDecodeSplitKvCopiesBoxes; tests and benchmarks).
  bool cp_async_copies = false;
};

// Whether the split-KV path, for these params on the current device, copies the chunks of the
// selected blocks (compressed_branch false) or of the compressed branch (true) as tensor-map boxes
// rather than with 16-byte cp.async: sm_90, the pool's num_pages known, page_rows a multiple of 64,
// and chunks that start on multiples of 64 rows (selected: l' a multiple of 64; compressed:
// l = d = l'). Same results either way; the boxes stream faster.
bool NsaDecodeSplitKvCopiesBoxes(const NsaDecodeParams& params, bool compressed_branch);

// Whether the kernels are instantiated for these head dims (d_k/d_v pairs 64/64, 128/128, 192/128, 192/192,
// 16/16, 32/32, 24/16) and group size (1..64). Refuse a model at load when this is false.
bool NsaDecodeSupported(int head_dim_qk, int head_dim_v, int group_size);

// Device workspace the three-argument LaunchNsaDecode needs: 0 (the single-kernel path keeps its
// scratch in shared memory). The split-KV path needs NsaDecodeSplitKvWorkspaceBytes.
size_t NsaDecodeWorkspaceBytes(int num_seqs, int num_kv_heads, int group_size, int max_context);

// Enqueues the decode attention on `stream` with the single-kernel path: one thread block per
// (sequence, KV head). cudaErrorInvalidValue for unsupported or inconsistent params (nothing is
// launched then); otherwise the launch status.
cudaError_t LaunchNsaDecode(const NsaDecodeParams& params, void* workspace, cudaStream_t stream);

// Whether the split-KV path runs these head dims and group size (today d_k/d_v 192/128 and 64/64,
// G <= 64). Other supported shapes run the single-kernel path.
bool NsaDecodeSplitKvSupported(int head_dim_qk, int head_dim_v, int group_size);

// Device workspace for the split-KV path with these params (sizes, geometry and max_context are used,
// pointers are not) on the current device; 0 when the path does not apply. Size it once for the
// largest batch and context: a launch with a smaller workspace cuts its work into fewer splits.
size_t NsaDecodeSplitKvWorkspaceBytes(const NsaDecodeParams& params);

// The same attention, split across thread blocks (kernels/nsa_decode_split.cuh: compressed attention
// and block scores, top-n, window and selected attention, merge with the gated sum; four kernels
// chained with programmatic dependent launch, capturable in a CUDA graph). Runs the single-kernel
// path instead when workspace is null, the shape is not split-KV supported, or workspace_bytes is
// below what even one split per branch needs. The workspace needs no initialisation; it must not be
// shared with work running concurrently.
cudaError_t LaunchNsaDecode(const NsaDecodeParams& params, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream);

}  // namespace needle::kernels
