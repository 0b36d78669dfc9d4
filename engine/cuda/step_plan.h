// The CUDA executor's per-step metadata, built on the host once per step and uploaded in one copy:
// packed token ids and positions, chunk offsets, every sequence's page table for each pool, the slot
// of every cache write (selection, window ring, staging ring, with the ring rows that a later token of
// the same chunk overwrites skipped), the compressed tokens the step completes, and which packed
// tokens need logits. Every layer's launches read it. Pure host code with no CUDA runtime calls, so it
// is tested without a GPU; it never touches cache memory or the KvCacheManager's accounting.
//
// Packing: sequences with exactly one token ("decodes") come first, in plan order, then the longer
// chunks ("prefills"), in plan order. The NSA decode kernel then reads tokens, positions and page
// tables [0, num_decodes), the prefill kernel the rest, each from an offset into the same arrays.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/executor.h"
#include "engine/kv_cache.h"
#include "engine/model_config.h"
#include "kernels/compress.h"

namespace needle::engine::cuda {

// Per-step limits fixed when the executor is built (its buffers are sized for them).
struct PlanLimits {
  int max_tokens = 2048;     // tokens per step (all sequences together)
  int max_seqs = 256;        // sequences per step
  int64_t max_context = 0;   // every position must be < max_context (< 2^31)
};

// What the plan builder needs to know about the model and the cache, fixed per executor.
struct PlanGeometry {
  int vocab = 0;
  bool is_nsa = false;
  bool mlp_cmp = false;   // compression reads raw pre-RoPE rows from the staging ring + the chunk
  NsaParams nsa;
  CacheLayout layout;
  int64_t num_pages[kNumPools] = {0, 0, 0, 0};  // real pages per pool; page id num_pages[p] is the
                                                // pool's poison page, which unused table entries name
  PlanLimits limits;

  static PlanGeometry For(const ModelConfig& model, const KvCacheConfig& cache, const PlanLimits& limits);
  bool HasPool(Pool p) const { return layout.has_pool[static_cast<int>(p)]; }
};

// How CudaExecutor pads a pure-decode step (every sequence one token) to the shape of a captured CUDA
// graph: a graph bakes in every launch parameter and every offset into the plan buffer, so all the
// steps that replay one graph must have the same layout. The padded layout is that of a step of
// exactly `num_seqs` one-token sequences completing `num_items` compressed tokens, with page-table rows
// of `table_stride[p]` entries, whatever the real step holds. Padding sequences are inert: token 0 at
// position -1 (the attention kernels read nothing for a negative position and write NaN, or for the
// dense kernels an undefined but row-local value, into that row only), every page-table entry the
// poison page, every cache write slot -1 (skipped). Padding compressed tokens repeat the step's first
// real one (same inputs, same destination, the same bits written twice), so they need a real one:
// num_items is 0 exactly when the step completes none.
struct DecodePadding {
  int num_seqs = 0;
  int num_items = 0;
  int32_t table_stride[kNumPools] = {0, 0, 0, 0};  // present pools: >= every sequence's table
};

// Where each part of the step's metadata lives in the plan buffer (byte offsets from its start; the
// same offsets index the pinned host buffer and its device copy) and the counts the launches need.
struct StepPlanLayout {
  int num_tokens = 0;    // T, packed: decodes first
  int num_seqs = 0;
  int num_decodes = 0;   // sequences with one token: internal indices (and tokens) 0..num_decodes-1
  int num_items = 0;     // compressed tokens the step completes
  int num_logit_rows = 0;
  int32_t table_stride[kNumPools] = {0, 0, 0, 0};  // entries per sequence row (>= 1 for present pools)
  size_t bytes = 0;      // total bytes used
  // The StepPlan's own part; below num_seqs / num_items / num_logit_rows only with DecodePadding.
  int plan_seqs = 0;     // internal sequences 0..plan_seqs-1 are the plan's, the rest padding
  int plan_items = 0;    // items 0..plan_items-1 are the step's, the rest repeat item 0
  int output_rows = 0;   // rows of StepOutput::logits (the first output_rows logit rows)

  size_t token_ids = 0;          // int32 [T]
  size_t positions = 0;          // int32 [T]: absolute position of each packed token
  size_t cu_tokens = 0;          // int32 [num_seqs + 1]: packed token offsets, internal order
  size_t start_pos = 0;          // int32 [num_seqs]: position of each sequence's first token
  size_t prefill_cu_tokens = 0;  // int32 [num_seqs - num_decodes + 1]: cu_tokens of the prefill
                                 // sequences relative to packed token num_decodes
  size_t tables[kNumPools] = {0, 0, 0, 0};  // int32 [num_seqs][table_stride[p]], present pools only
  size_t sel_slots = 0;          // int64 [T]: selection-cache slot of each token
  size_t win_slots = 0;          // int64 [T]: window-ring slot or -1 (window pool only)
  size_t stg_slots = 0;          // int64 [T]: staging-ring slot or -1 (staging pool only)
  size_t items = 0;              // kernels::CompressItem [num_items] (NSA only)
  size_t logit_rows = 0;         // int32 [num_logit_rows]: packed token of each output row, in
                                 // StepOutput row order

  // Host side only.
  int64_t max_prefill_end = 0;      // max over the prefill sequences of start_pos + tokens (0: none);
                                    // bounds their queries' positions + 1 (the prefill kernels size
                                    // their on-chip block scores by it)
  std::vector<int> order;           // internal sequence index -> plan index [plan_seqs]
  std::vector<int> token_base;      // internal sequence index -> its first packed token [num_seqs]
  std::vector<int64_t> first_row;   // plan index -> StepOutput::first_row
};

// Validates the plan against the limits, the vocabulary and the page tables (INVALID_ARGUMENT for
// what a caller can get wrong, INTERNAL for page tables that cannot serve the step) and lays out the
// buffer. With `pad`, lays out the padded pure-decode step instead; FAILED_PRECONDITION when the plan
// does not fit the padding (not pure decode, more sequences or compressed tokens, a longer table, a
// step with compressed tokens padded to none or the reverse, or padding beyond the limits). No side
// effects.
absl::StatusOr<StepPlanLayout> LayoutStepPlan(const StepPlan& plan, const PlanGeometry& geo,
                                              const DecodePadding* pad = nullptr);

// Compressed tokens that a one-token step at `pos` completes (0 or 1; 0 for dense models).
int CompressedCompletedAt(const PlanGeometry& geo, int64_t pos);

// Fills `base` (at least layout.bytes bytes, 16-byte aligned) for a layout LayoutStepPlan returned
// for this plan (padded or not). Cannot fail.
void WriteStepPlan(const StepPlan& plan, const PlanGeometry& geo, const StepPlanLayout& layout, char* base);

// A typed pointer into a plan buffer (host or device).
template <class T>
T* PlanAt(void* base, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

// Bytes of the plan buffer for a step at the limits with page tables of `table_entries[p]` entries per
// sequence: the executor's initial allocation (it grows the buffer if a step ever needs more).
size_t StepPlanBytesBound(const PlanGeometry& geo, const int64_t table_entries[kNumPools]);

}  // namespace needle::engine::cuda
