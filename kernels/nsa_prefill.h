// NSA prefill attention: the same three gated branches as NSA decode (kernels/nsa_decode.h), for a
// chunk of query tokens from each of one or more sequences, positions start..start+len-1. This header
// declares the params and the launcher and compiles with g++.
//
// Contract (the CPU executor's order, engine/cpu_executor.cc): before the launch the caller has
// written the chunk's selection-branch K/V into the selection cache and every compressed token the
// chunk completes into the compressed cache, so those two caches hold rows 0..t for every query.
// The window ring is different: a chunk longer than the ring would overwrite rows its own earlier
// queries still read, so the caller writes the chunk's window rows to the ring only AFTER this
// kernel, and passes them here as chunk buffers (one row per token, of any row stride): window rows
// >= start come from window_k_chunk/window_v_chunk, rows < start from the ring. With shared_kv the
// window reads the selection cache and the chunk buffers are unused.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/nsa_decode.h"
#include "kernels/paged_kv.h"

namespace needle::kernels {

struct NsaPrefillParams {
  // [num_tokens][num_heads][head_dim_qk] bf16: the chunks' queries, post-RoPE, sequence after
  // sequence (sequence s owns tokens cu_tokens[s]..cu_tokens[s+1]-1).
  const __nv_bfloat16* q = nullptr;
  // [num_tokens][num_heads][3] (cmp, slc, win), already sigmoided; bf16 or fp32 per gate_dtype.
  const void* gates = nullptr;
  GateDType gate_dtype = GateDType::kBf16;
  // [num_tokens][num_heads][head_dim_v] bf16.
  __nv_bfloat16* out = nullptr;
  // Optional (nullptr: not written). [num_tokens][num_kv_heads][num_selected] int32, ascending, -1
  // in unused slots.
  int32_t* selected_blocks = nullptr;
  // [num_seqs + 1] int32: token offsets of each sequence's chunk; cu_tokens[0] = 0,
  // cu_tokens[num_seqs] = num_tokens, non-decreasing.
  const int32_t* cu_tokens = nullptr;
  // [num_seqs] int32: the position of each chunk's first token. Token i of sequence s sits at
  // position start_pos[s] + (i - cu_tokens[s]). Page-table row s belongs to sequence s.
  const int32_t* start_pos = nullptr;

  int num_seqs = 0;
  int num_tokens = 0;
  int num_heads = 0;     // H
  int num_kv_heads = 0;  // Hkv; G = H / Hkv must be in 1..64
  int head_dim_qk = 0;   // d_k
  int head_dim_v = 0;    // d_v
  int max_context = 0;   // upper bound on (position + 1) of every query; sizes per-block scratch
  float softmax_scale = 0.0f;  // 1 / sqrt(d_k)
  NsaKernelGeometry geometry;

  PagedKvCache compressed;  // rows: compressed tokens (chunk's completed ones already written)
  PagedKvCache selection;   // rows: positions (chunk's rows already written)
  PagedKvCache window;      // ring (ring_pages > 0) holding rows < start only; ignored when shared_kv
  // bf16 [num_tokens][window_k_chunk_stride] / [num_tokens][window_v_chunk_stride], the first
  // num_kv_heads * head_dim_qk / head_dim_v columns of each row: the chunk's window-branch K/V
  // (post-RoPE, [num_kv_heads][head_dim] per token), same token order as q. Required when !shared_kv.
  const __nv_bfloat16* window_k_chunk = nullptr;
  const __nv_bfloat16* window_v_chunk = nullptr;
  // Elements between consecutive tokens' rows; 0: contiguous rows (num_kv_heads * head_dim_qk,
  // num_kv_heads * head_dim_v). Wider when the rows are column ranges of a wider buffer, as in the
  // CUDA executor's fused projection output. The tensor-core path copies rows in 16-byte pieces: a
  // chunk whose pointers or strides are not 16-byte aligned runs the simple kernel instead.
  int64_t window_k_chunk_stride = 0;
  int64_t window_v_chunk_stride = 0;
  bool shared_kv = true;  // the window branch reads the selection cache
  // Forces the simple kernel (one 256-thread block per (query token, KV head), scalar dot products)
  // where the tensor-core path would run; for tests and benchmarks.
  bool simple = false;
};

bool NsaPrefillSupported(int head_dim_qk, int head_dim_v, int group_size);

// Device workspace LaunchNsaPrefill needs (0 today).
size_t NsaPrefillWorkspaceBytes(int num_tokens, int num_kv_heads, int group_size, int max_context);

// One thread block per (query token, KV head): the tensor-core path (kernels/nsa_prefill_tc.cuh) for
// d_k/d_v 192/128, 128/128 and 64/64 when its shared memory fits (the compressed branch in two passes
// on long contexts), else (and with params.simple) the simple kernel. cudaErrorInvalidValue for
// unsupported or inconsistent params (nothing launched); otherwise the launch status.
cudaError_t LaunchNsaPrefill(const NsaPrefillParams& params, void* workspace, cudaStream_t stream);

// Whether LaunchNsaPrefill runs the tensor-core path for these (valid) params rather than the simple
// kernel, which is tens of times slower.
bool NsaPrefillUsesTensorCores(const NsaPrefillParams& params);

}  // namespace needle::kernels
