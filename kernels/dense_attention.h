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
};

bool DenseAttentionSupported(int head_dim_qk, int head_dim_v, int group_size);

// Device workspace LaunchDenseAttention needs (0 today: no split-KV yet).
size_t DenseAttentionWorkspaceBytes(int num_tokens, int num_kv_heads, int group_size, int max_context);

// One thread block per (query token, KV head). cudaErrorInvalidValue for unsupported or
// inconsistent params (nothing launched); otherwise the launch status.
cudaError_t LaunchDenseAttention(const DenseAttentionParams& params, void* workspace, cudaStream_t stream);

}  // namespace needle::kernels
