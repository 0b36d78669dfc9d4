// CudaExecutor: the whole model on one GPU behind the Executor interface, with the CpuExecutor's
// semantics and op order (engine/cpu_executor.cc) in bf16 storage with fp32 accumulation. It owns the
// device copy of the weights, the KV pools the KvCacheManager's page ids index (docs/kv-cache.md's
// layout, bf16), fixed activation buffers sized for the step limits, the step plan buffers (one pinned
// host buffer, one device copy), a cuBLASLt handle and one compute stream. It never sees requests,
// sampling or pool accounting. Pure-decode steps are captured once per batch-size bucket as a CUDA
// graph and replayed (one launch instead of ~10 per layer). Structure, memory, graphs and tolerances:
// docs/cuda-executor.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/cuda/device_memory.h"
#include "engine/cuda/device_weights.h"
#include "engine/cuda/step_plan.h"
#include "engine/executor.h"
#include "engine/kv_cache.h"
#include "engine/weights.h"
#include "kernels/gemm.h"
#include "kernels/kv_append.h"
#include "kernels/paged_kv.h"

namespace needle::engine::cuda {

struct CudaExecutorConfig {
  int device = 0;                 // CUDA device ordinal
  int max_tokens_per_step = 2048; // tokens of one step, all sequences together (activation buffers)
  int max_seqs_per_step = 256;    // sequences of one step
  int64_t max_context = 0;        // positions must stay below it; 0: the model's max_position_embeddings
  int max_logit_rows = 0;         // rows of the device logits buffer; 0: max_seqs_per_step. Steps
                                  // needing more (all_logits) compute logits in passes of this many
  bool cuda_graphs = true;        // replay pure-decode steps from CUDA graphs captured per batch
                                  // bucket; false runs every step eagerly (launch by launch)
  bool fail_graph_captures = false;  // tests only: every capture is invalidated by a call that is
                                     // illegal while capturing, to exercise the eager fallback

  absl::Status Validate() const;
};

class CudaExecutor final : public Executor {
 public:
  // Checks the model is supported (UNIMPLEMENTED otherwise), uploads the weights and allocates the
  // pools `cache` describes plus the step buffers. The host weights are not referenced afterwards.
  static absl::StatusOr<std::unique_ptr<CudaExecutor>> Create(const ModelWeights& weights,
                                                              const KvCacheConfig& cache,
                                                              const CudaExecutorConfig& config = {});
  ~CudaExecutor() override;

  const char* name() const override { return "cuda"; }
  // Runs the step and copies its logits to `out`; returns after the device is done. A CUDA error is
  // returned as INTERNAL naming the call (and the layer); the caches are undefined afterwards.
  absl::Status Run(const StepPlan& plan, StepOutput* out) override;

  // Device bytes held: weights, KV pools, activations and workspaces.
  int64_t device_bytes() const;

  // What the decode graphs did so far (tests, logs).
  struct GraphStats {
    int64_t captures = 0;      // graphs captured and instantiated
    int64_t replays = 0;       // steps that ran as a graph launch (the capturing step included)
    int64_t failures = 0;      // captures or instantiations that failed (that bucket then runs eagerly)
    int64_t eager_steps = 0;   // steps run launch by launch (mixed/prefill steps, graphs off, fallback)
    int64_t invalidations = 0; // times every graph was dropped because a buffer it uses was reallocated
    int live_graphs = 0;       // instantiated graphs held now
  };
  GraphStats graph_stats() const;
  // Batch sizes the decode graphs are captured for, ascending (empty with cuda_graphs off): powers of
  // two, then the largest batch a graph can take (max_seqs_per_step, bounded by max_tokens_per_step
  // and max_logit_rows).
  const std::vector<int>& graph_buckets() const { return buckets_; }

 private:
  // One pool's K and V arrays: (num_pages + 1) pages of [layers][Hkv][rows][d]; the last page is the
  // poison page (bf16 NaN) that unused page-table entries point at.
  struct DevicePool {
    DeviceBuffer k, v;
    int rows = 0;
    int32_t pages = 0;  // physical pages, the poison page included
    int64_t k_page_stride = 0, v_page_stride = 0;  // elements
  };

  CudaExecutor(const ModelConfig& model, const KvCacheConfig& cache, const CudaExecutorConfig& config);
  absl::Status Init(const ModelWeights& weights, const KvCacheConfig& cache);
  absl::Status EnsurePlanCapacity(size_t bytes);
  absl::Status EnsureCompressWorkspace(size_t bytes);
  // Attention workspace for a step of these sizes (the kernels' *WorkspaceBytes queries).
  absl::Status EnsureAttentionWorkspace(int num_decodes, int num_tokens);
  // A captured pure-decode step: one per (batch bucket, compressed-token bucket).
  struct DecodeGraph {
    cudaGraphExec_t exec = nullptr;
    size_t plan_bytes = 0;  // the plan upload baked into it (a check: same key, same layout)
    bool failed = false;    // capture or instantiation failed once: this key runs eagerly for good
  };
  using GraphKey = std::pair<int, int>;  // (sequences, compressed tokens) after padding

  // The padding of a step that may run as a graph; false: run it eagerly (graphs off, not pure
  // decode, too many sequences, a page table longer than the fixed stride).
  bool GraphPaddingFor(const StepPlan& plan, DecodePadding* pad) const;
  absl::Status RunEager(const StepPlan& plan, StepOutput* out);
  // Runs a padded pure-decode step from its graph, capturing it first if needed. Sets *ran = false
  // (and leaves `out` alone) when capture or instantiation failed; the caller then runs it eagerly.
  absl::Status RunGraph(const StepPlan& plan, const StepPlanLayout& sp, StepOutput* out, bool* ran);
  absl::Status Capture(const StepPlanLayout& sp, cudaGraphExec_t* exec);
  // Synchronises with the previous step, grows the buffers the step needs (dropping the graphs when
  // one moves) and fills the pinned plan buffer. Output rows NaN-filled.
  absl::Status PrepareStep(const StepPlan& plan, const StepPlanLayout& sp, StepOutput* out);
  // Everything of a step up to the device logits of rows [0, min(rows, max_logit_rows)): the plan
  // upload, the embedding, the layers and the first logits pass. What a graph captures.
  absl::Status EnqueueForward(const StepPlanLayout& sp);
  absl::Status RunLayer(int layer, const StepPlanLayout& sp);
  // Final norm and lm_head of logit rows [r0, r0 + n) into the device logits buffer.
  absl::Status EnqueueLogitsPass(const StepPlanLayout& sp, int r0, int n);
  void DropGraphs();
  absl::Status Gemm(int64_t rows, int64_t in, int64_t out, const bf16* x, int64_t x_stride, const bf16* w,
                    const bf16* bias, void* y, int64_t y_stride, kernels::GemmOutput y_type, bool accumulate);

  kernels::PagedPool KPool(Pool p, int layer) const;
  kernels::PagedPool VPool(Pool p, int layer) const;
  // The attention kernels' view of pool p at `layer`, page-table rows from internal sequence `seq0`.
  kernels::PagedKvCache Cache(Pool p, int layer, const StepPlanLayout& sp, int seq0) const;
  template <class T>
  T* Plan(size_t offset) const {
    return PlanAt<T>(plan_dev_.get(), offset);
  }

  ModelConfig model_;
  CudaExecutorConfig config_;
  PlanGeometry geo_;
  bool nsa_ = false, mlp_cmp_ = false, win_pool_ = false;
  FusedProjection fused_;  // columns of proj_'s parts (the weights' layout)

  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t cublas_ = nullptr;
  std::unique_ptr<DeviceWeights> weights_;
  DevicePool pools_[kNumPools];

  // Activations, [max_tokens_per_step][width] bf16 unless noted.
  DeviceBuffer x_;         // residual stream [hidden]
  DeviceBuffer xn_;        // normalised input of the current sub-block [hidden]
  DeviceBuffer q_;         // [H*d_k], post-RoPE
  // The fused input projection's output [fused_.width]: gate logits (NSA) and the used branches' K/V
  // (selection only for shared K/V and llama; cmp, selection and window for nsa-paper), each a column
  // range of every row, so every consumer reads it with row stride fused_.width. Keys post-RoPE,
  // except the MLP compression's cmp keys.
  DeviceBuffer proj_;
  DeviceBuffer gates_;     // fp32 [H][3] (NSA), sigmoided
  DeviceBuffer attn_;      // attention output [H*d_v]
  DeviceBuffer mlp_;       // [2I]: gate | up, then silu(gate)*up in the gate half
  DeviceBuffer logits_;    // fp32 [max_logit_rows][vocab]
  DeviceBuffer gemm_workspace_;
  DeviceBuffer compress_workspace_;
  DeviceBuffer attention_workspace_;

  PinnedBuffer plan_host_;
  DeviceBuffer plan_dev_;

  // CUDA graphs of pure-decode steps. They bake in the addresses of every buffer above, so a buffer
  // that is reallocated drops them all (DropGraphs).
  std::vector<int> buckets_;
  int32_t graph_table_stride_[kNumPools] = {0, 0, 0, 0};  // page-table entries per padded row
  std::map<GraphKey, DecodeGraph> graphs_;
  GraphStats graph_stats_;
};

}  // namespace needle::engine::cuda
