// Dense paged causal attention for the `llama` baseline: decode (one query token per sequence) and
// prefill chunks (several tokens per sequence), GQA, reading one paged K/V cache. The semantics are
// kernels/reference/attention_ref.h's DenseAttention: query t attends to keys 0..t. This header
// declares the params and the launcher and compiles with g++.
//
// Contract: the cache already holds rows 0..t of every query (a prefill chunk's own K/V written
// first, as the CPU executor does). The kernel writes only `out`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/paged_kv.h"

namespace needle::kernels {

struct DenseAttentionParams {
  // [num_tokens][num_heads][head_dim_qk] bf16, post-RoPE. Head h uses KV head h / G.
  const __nv_bfloat16* q = nullptr;
  // [num_tokens][num_heads][head_dim_v] bf16.
  __nv_bfloat16* out = nullptr;
  // [num_seqs + 1] int32 token offsets of each sequence's chunk (cu_tokens[0] = 0,
  // cu_tokens[num_seqs] = num_tokens), or nullptr for decode: token s is sequence s's only query.
  const int32_t* cu_tokens = nullptr;
  // [num_seqs] int32: the position of each sequence's first query token (decode: its only one).
  const int32_t* start_pos = nullptr;

  int num_seqs = 0;
  int num_tokens = 0;    // == num_seqs for decode
  int num_heads = 0;     // H
  int num_kv_heads = 0;  // Hkv; G = H / Hkv must be in 1..64
  int head_dim_qk = 0;
  int head_dim_v = 0;
  float softmax_scale = 0.0f;  // 1 / sqrt(d_k)

  PagedKvCache kv;  // rows: positions; ring_pages must be 0

  // Split-KV decode path only (cu_tokens == nullptr): an upper bound on start_pos[s] + 1 over the
  // batch (0: unknown, the single-kernel path runs); a query at or beyond it gets NaN outputs.
  int max_context = 0;
  // Split-KV path only: 0 picks the chunks (64 rows each) per thread block from the batch shape and
  // the device; k > 0 makes every split k chunks (tests and tuning).
  int chunks_per_split = 0;
  // Split-KV path only: copy K/V chunks with 16-byte cp.async even where tensor-map boxes apply
  // (kv.num_pages known, whole-chunk pages, sm_90; tests and benchmarks).
  bool cp_async_copies = false;
  // Prefill chunks only: true runs the simple one-block-per-(token, KV head) kernel even where the
  // tensor-core prefill path applies (tests and benchmarks).
  bool simple_prefill = false;
  // Tensor-core prefill path only: round the softmax probabilities P to bf16 once before P.V, as
  // FlashAttention does (faster: half the P.V tensor-core work; each output element off by up to
  // 2^-8 max|v| more). The default carries P as a bf16 hi + lo pair (~16 mantissa bits, the decode
  // path's precision), which keeps every element within the tests' 2e-4 + 1e-2 |e| of the reference.
  bool prefill_p_bf16 = false;
};

bool DenseAttentionSupported(int head_dim_qk, int head_dim_v, int group_size);

// Device workspace the three-argument LaunchDenseAttention needs: 0. The split-KV decode path needs
// DenseAttentionSplitKvWorkspaceBytes.
size_t DenseAttentionWorkspaceBytes(int num_tokens, int num_kv_heads, int group_size, int max_context);

// Decode: one thread block per (query token, KV head). Prefill chunks (cu_tokens != nullptr): the
// tensor-core prefill path where DenseAttentionPrefillSupported (no workspace; `workspace` is
// ignored), else the same simple kernel. cudaErrorInvalidValue for unsupported or inconsistent
// params (nothing launched); otherwise the launch status.
cudaError_t LaunchDenseAttention(const DenseAttentionParams& params, void* workspace, cudaStream_t stream);

// Whether prefill chunks with these head dims and group size run the tensor-core prefill path
// (FlashAttention-2 style: a thread block takes 64 (query token, head of the group) rows of one
// sequence and KV head, walks the keys 0..last position in 64-row chunks, online softmax in fp32,
// bf16 mma.sync; no workspace). Today d_k/d_v 192/128, 128/128 and 64/64, G <= 64.
bool DenseAttentionPrefillSupported(int head_dim_qk, int head_dim_v, int group_size);

// Whether the split-KV decode path runs these head dims and group size (today d_k/d_v 192/128,
// 128/128 and 64/64, G <= 64).
bool DenseAttentionSplitKvSupported(int head_dim_qk, int head_dim_v, int group_size);

// Whether the split-KV decode path, for these params on the current device, copies K/V chunks as
// tensor-map boxes (sm_90, kv.num_pages known, page_rows a multiple of 64, !cp_async_copies) rather
// than with 16-byte cp.async. Both give the same results; the boxes stream faster.
bool DenseAttentionSplitKvCopiesBoxes(const DenseAttentionParams& params);

// Device workspace of the split-KV decode path for these params (sizes and max_context are used,
// pointers are not) on the current device; 0 when the path does not apply (prefill chunks,
// max_context 0, unsupported shape). Size it for the largest batch and context: a launch with a
// smaller workspace uses fewer splits.
size_t DenseAttentionSplitKvWorkspaceBytes(const DenseAttentionParams& params);

// Decode split across thread blocks: chunks of 64 rows per block, the G heads of a group packed as
// the rows of tensor-core tiles, partial softmax states merged by log-sum-exp in a second kernel.
// Runs what the three-argument launcher runs (prefill chunks: the tensor-core prefill path or the
// simple kernel; decode: the single-kernel path) when workspace is null, for prefill chunks,
// max_context 0, an unsupported shape, or a workspace too small for one split per sequence. The
// workspace needs no initialisation and must not be shared with concurrent work.
cudaError_t LaunchDenseAttention(const DenseAttentionParams& params, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream);

}  // namespace needle::kernels
