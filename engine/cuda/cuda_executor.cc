// CudaExecutor: construction (weights, pools, fixed buffers) and the step: one plan upload, the
// embedding, the layer loop in CpuExecutor's op order, the logits. All work goes to one stream; Run
// returns after a single synchronisation at the end (the logits copy).
//
// Per layer: RMSNorm; the q (+bias) GEMM and one fused GEMM for the gate logits and every used branch's
// K/V (device_weights.h's FusedProjection); RoPE on q and the post-RoPE keys (not the MLP compression's
// pre-RoPE cmp keys); selection-cache append; window-ring rows of single-token decodes
// (the decode kernel reads row t from the ring; the slot it overwrites, t - R*P, is outside every
// window); compressed tokens the step completes; attention (nsa_decode for one-token sequences,
// nsa_prefill for longer chunks, dense_attention for llama); then the ring appends of the prefill
// chunks (window) and of every token (staging), after attention because a chunk longer than a ring
// wraps over rows its own earlier queries read; o_proj accumulating into the residual; RMSNorm;
// gate|up GEMM; SwiGLU; down GEMM accumulating.
//
// Pure-decode steps (every sequence one token) of at most the largest batch bucket run from CUDA
// graphs: the step is padded to its bucket (step_plan.h's DecodePadding), so that the plan layout
// and every launch parameter depend only on the bucket, captured on first use and replayed after
// the host has refilled the same pinned plan buffer. The logits copy to the caller's (pageable,
// per-step) vector stays outside the graph.
#include "engine/cuda/cuda_executor.h"

#include <cublasLt.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"
#include "engine/cuda/cuda_status.h"
#include "kernels/compress.h"
#include "kernels/dense_attention.h"
#include "kernels/embedding.h"
#include "kernels/gates.h"
#include "kernels/nsa_decode.h"
#include "kernels/nsa_prefill.h"
#include "kernels/rms_norm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "spdlog/spdlog.h"

namespace needle::engine::cuda {
namespace {

constexpr int Index(Pool p) { return static_cast<int>(p); }

kernels::NsaKernelGeometry KernelGeometry(const NsaParams& n) {
  kernels::NsaKernelGeometry g;
  g.cmp_block = n.cmp_block;
  g.cmp_stride = n.cmp_stride;
  g.sel_block = n.sel_block;
  g.num_selected = n.num_selected;
  g.forced_initial = n.forced_initial;
  g.forced_local = n.forced_local;
  g.window = n.window;
  g.topk_merge_chunk = n.topk_merge_chunk;
  return g;
}

// Items the plan buffer is first sized for (a chunk of len tokens completes <= (len-1)/d + 1).
int MaxItemsBound(const CudaExecutorConfig& c, const ModelConfig& m) {
  if (!m.IsNsa()) return 0;
  return c.max_tokens_per_step / std::max(m.nsa.cmp_stride, 1) + c.max_seqs_per_step;
}

}  // namespace

absl::Status CudaExecutorConfig::Validate() const {
  if (device < 0) return absl::InvalidArgumentError("CUDA executor: device must be >= 0");
  if (max_tokens_per_step < 1) return absl::InvalidArgumentError("CUDA executor: max_tokens_per_step must be >= 1");
  if (max_seqs_per_step < 1) return absl::InvalidArgumentError("CUDA executor: max_seqs_per_step must be >= 1");
  if (max_context < 0 || max_context > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("CUDA executor: max_context must be in [0, 2^31)");
  }
  if (max_logit_rows < 0) return absl::InvalidArgumentError("CUDA executor: max_logit_rows must be >= 0");
  return absl::OkStatus();
}

CudaExecutor::CudaExecutor(const ModelConfig& model, const KvCacheConfig& cache, const CudaExecutorConfig& config)
    : model_(model), config_(config) {
  if (config_.max_context == 0) config_.max_context = model.max_position_embeddings;
  if (config_.max_logit_rows == 0) config_.max_logit_rows = config_.max_seqs_per_step;
  config_.max_logit_rows = std::min(config_.max_logit_rows, config_.max_tokens_per_step);
  PlanLimits limits;
  limits.max_tokens = config_.max_tokens_per_step;
  limits.max_seqs = config_.max_seqs_per_step;
  limits.max_context = config_.max_context;
  geo_ = PlanGeometry::For(model, cache, limits);
  nsa_ = model.IsNsa();
  mlp_cmp_ = geo_.mlp_cmp;
  win_pool_ = geo_.HasPool(Pool::kWindow);
}

absl::StatusOr<std::unique_ptr<CudaExecutor>> CudaExecutor::Create(const ModelWeights& weights,
                                                                   const KvCacheConfig& cache,
                                                                   const CudaExecutorConfig& config) {
  NEEDLE_RETURN_IF_ERROR(config.Validate());
  NEEDLE_RETURN_IF_ERROR(cache.Validate(weights.config));
  NEEDLE_RETURN_IF_ERROR(CheckModelSupported(weights.config));
  std::unique_ptr<CudaExecutor> e(new CudaExecutor(weights.config, cache, config));
  if (e->config_.max_context < 1 || e->config_.max_context > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA executor: the context (", e->config_.max_context,
                                                   ") must be in [1, 2^31)"));
  }
  NEEDLE_RETURN_IF_ERROR(e->Init(weights, cache));
  return e;
}

absl::Status CudaExecutor::Init(const ModelWeights& weights, const KvCacheConfig& cache) {
  const ModelConfig& m = model_;
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaSetDevice(config_.device));
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  if (const cublasStatus_t s = cublasLtCreate(&cublas_); s != CUBLAS_STATUS_SUCCESS) {
    cublas_ = nullptr;
    return absl::InternalError(absl::StrCat("cublasLtCreate: cublasStatus_t ", static_cast<int>(s)));
  }
  NEEDLE_ASSIGN_OR_RETURN(weights_, DeviceWeights::Upload(weights));
  fused_ = weights_->fused_projection();

  // KV pools, one extra (poison) page each, filled with bf16 NaN (0xFFFF): a read of a row nobody
  // wrote, or through an unused page-table entry, poisons the result instead of passing silently.
  const CacheLayout& layout = geo_.layout;
  const int rows[kNumPools] = {layout.page_tokens, layout.cmp_page_tokens, layout.page_tokens, layout.staging_rows};
  for (int p = 0; p < kNumPools; ++p) {
    if (!layout.has_pool[p]) continue;
    DevicePool& pool = pools_[p];
    pool.rows = rows[p];
    pool.k_page_stride = static_cast<int64_t>(m.num_layers) * m.num_kv_heads * pool.rows * m.head_dim_qk;
    pool.v_page_stride = static_cast<int64_t>(m.num_layers) * m.num_kv_heads * pool.rows * m.head_dim_v;
    const size_t pages = static_cast<size_t>(cache.num_pages[p]) + 1;
    pool.pages = static_cast<int32_t>(pages);
    const std::string what = absl::StrCat("the ", PoolName(static_cast<Pool>(p)), " KV pool");
    NEEDLE_RETURN_IF_ERROR(pool.k.Allocate(pages * pool.k_page_stride * sizeof(bf16), what.c_str()));
    NEEDLE_RETURN_IF_ERROR(pool.v.Allocate(pages * pool.v_page_stride * sizeof(bf16), what.c_str()));
    NEEDLE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(pool.k.get(), 0xFF, pool.k.bytes(), stream_));
    NEEDLE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(pool.v.get(), 0xFF, pool.v.bytes(), stream_));
  }

  // Activations for max_tokens_per_step rows.
  const size_t T = static_cast<size_t>(config_.max_tokens_per_step);
  const size_t D = m.hidden_size, H = m.num_heads, dk = m.head_dim_qk, dv = m.head_dim_v;
  const size_t b = sizeof(bf16);
  NEEDLE_RETURN_IF_ERROR(x_.Allocate(T * D * b, "the residual stream"));
  NEEDLE_RETURN_IF_ERROR(xn_.Allocate(T * D * b, "the normalised activations"));
  NEEDLE_RETURN_IF_ERROR(q_.Allocate(T * H * dk * b, "the queries"));
  // The weights' fused projection must hold every part the layer loop reads.
  if ((win_pool_ && fused_.k[kWin] < 0) || (mlp_cmp_ && fused_.k[kCmp] < 0) || (nsa_ && fused_.gate < 0)) {
    return absl::InternalError("CUDA executor: the fused projection lacks a branch the step reads");
  }
  NEEDLE_RETURN_IF_ERROR(proj_.Allocate(T * static_cast<size_t>(fused_.width) * b, "the gate logits and K/V"));
  if (nsa_) NEEDLE_RETURN_IF_ERROR(gates_.Allocate(T * 3 * H * sizeof(float), "the gates"));
  NEEDLE_RETURN_IF_ERROR(attn_.Allocate(T * H * dv * b, "the attention output"));
  NEEDLE_RETURN_IF_ERROR(mlp_.Allocate(T * 2 * static_cast<size_t>(m.intermediate_size) * b, "the MLP activations"));
  NEEDLE_RETURN_IF_ERROR(logits_.Allocate(static_cast<size_t>(config_.max_logit_rows) * m.vocab_size * sizeof(float),
                                          "the logits"));
  NEEDLE_RETURN_IF_ERROR(gemm_workspace_.Allocate(kernels::GemmWorkspaceBytes(), "the cuBLASLt workspace"));
  if (mlp_cmp_) {
    NEEDLE_RETURN_IF_ERROR(EnsureCompressWorkspace(
        kernels::CompressMlpWorkspaceBytes(MaxItemsBound(config_, m), m.num_kv_heads, m.nsa.cmp_mlp_hidden)));
  }
  NEEDLE_RETURN_IF_ERROR(EnsureAttentionWorkspace(config_.max_seqs_per_step, config_.max_tokens_per_step));

  // The plan buffers, sized for a step at the limits whose sequences span the whole context.
  const std::vector<int64_t> per_seq = layout.PagesFor(config_.max_context);
  int64_t entries[kNumPools];
  for (int p = 0; p < kNumPools; ++p) entries[p] = per_seq[p];
  NEEDLE_RETURN_IF_ERROR(EnsurePlanCapacity(StepPlanBytesBound(geo_, entries)));

  // Decode-graph buckets: powers of two up to the largest batch one graph can take. A graph computes
  // all its rows' logits in one pass (the copy out is not in the graph), hence max_logit_rows.
  if (config_.cuda_graphs) {
    const int cap = std::min({config_.max_seqs_per_step, config_.max_tokens_per_step, config_.max_logit_rows});
    for (int64_t b = 1; b < cap; b *= 2) buckets_.push_back(static_cast<int>(b));
    buckets_.push_back(cap);
    // Padded page-table rows as long as a sequence spanning the whole context needs, so that a graph
    // serves every step of its bucket; the plan buffer above is already sized for that.
    for (int p = 0; p < kNumPools; ++p) {
      if (layout.has_pool[p]) graph_table_stride_[p] = static_cast<int32_t>(std::max<int64_t>(entries[p], 1));
    }
  }
  // The weight copies ran on the legacy stream, which the non-blocking compute stream does not wait for.
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

CudaExecutor::~CudaExecutor() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  for (auto& [key, g] : graphs_) {
    if (g.exec != nullptr) cudaGraphExecDestroy(g.exec);
  }
  if (cublas_ != nullptr) cublasLtDestroy(cublas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

CudaExecutor::GraphStats CudaExecutor::graph_stats() const {
  GraphStats s = graph_stats_;
  s.live_graphs = 0;
  for (const auto& [key, g] : graphs_) s.live_graphs += g.exec != nullptr ? 1 : 0;
  return s;
}

void CudaExecutor::DropGraphs() {
  bool any = false;
  for (auto it = graphs_.begin(); it != graphs_.end();) {
    if (it->second.exec != nullptr) {
      cudaGraphExecDestroy(it->second.exec);
      any = true;
    }
    // A key whose capture failed stays failed; the others are captured again when next needed.
    it = it->second.failed ? std::next(it) : graphs_.erase(it);
  }
  if (any) ++graph_stats_.invalidations;
}

int64_t CudaExecutor::device_bytes() const {
  int64_t n = weights_ ? static_cast<int64_t>(weights_->bytes()) : 0;
  for (const DevicePool& p : pools_) n += static_cast<int64_t>(p.k.bytes() + p.v.bytes());
  for (const DeviceBuffer* b : {&x_, &xn_, &q_, &proj_, &gates_, &attn_, &mlp_, &logits_, &gemm_workspace_,
                                &compress_workspace_, &attention_workspace_, &plan_dev_}) {
    n += static_cast<int64_t>(b->bytes());
  }
  return n;
}

absl::Status CudaExecutor::EnsurePlanCapacity(size_t bytes) {
  if (bytes <= plan_host_.bytes() && bytes <= plan_dev_.bytes()) return absl::OkStatus();
  // The previous step's upload may still read the pinned buffer.
  if (stream_ != nullptr) NEEDLE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  DropGraphs();  // they upload from and read the old buffers
  const size_t n = std::max(bytes, 2 * plan_host_.bytes());
  NEEDLE_RETURN_IF_ERROR(plan_host_.Allocate(n, "the step plan (host)"));
  NEEDLE_RETURN_IF_ERROR(plan_dev_.Allocate(n, "the step plan (device)"));
  return absl::OkStatus();
}

absl::Status CudaExecutor::EnsureCompressWorkspace(size_t bytes) {
  if (bytes <= compress_workspace_.bytes()) return absl::OkStatus();
  if (stream_ != nullptr) NEEDLE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  DropGraphs();
  return compress_workspace_.Allocate(std::max(bytes, 2 * compress_workspace_.bytes()), "the compression workspace");
}

absl::Status CudaExecutor::EnsureAttentionWorkspace(int num_decodes, int num_tokens) {
  const int hkv = model_.num_kv_heads, G = model_.GroupSize();
  const int ctx = static_cast<int>(config_.max_context);
  size_t bytes = 0;
  // The split-KV decode paths want scratch for their partial softmax states; sized at construction
  // for the largest batch and context, so later steps never reallocate.
  num_decodes = std::max(num_decodes, 1);  // the split-KV sizing queries want a non-empty batch
  if (nsa_) {
    kernels::NsaDecodeParams split;
    split.num_seqs = num_decodes;
    split.num_heads = model_.num_heads;
    split.num_kv_heads = hkv;
    split.head_dim_qk = model_.head_dim_qk;
    split.head_dim_v = model_.head_dim_v;
    split.max_context = ctx;
    split.geometry = KernelGeometry(model_.nsa);
    split.shared_kv = !win_pool_;
    bytes = std::max({kernels::NsaDecodeWorkspaceBytes(num_decodes, hkv, G, ctx),
                      kernels::NsaDecodeSplitKvWorkspaceBytes(split),
                      kernels::NsaPrefillWorkspaceBytes(num_tokens, hkv, G, ctx)});
  } else {
    kernels::DenseAttentionParams split;
    split.num_seqs = num_decodes;
    split.num_tokens = num_decodes;
    split.num_heads = model_.num_heads;
    split.num_kv_heads = hkv;
    split.head_dim_qk = model_.head_dim_qk;
    split.head_dim_v = model_.head_dim_v;
    split.max_context = ctx;
    bytes = std::max(kernels::DenseAttentionWorkspaceBytes(num_tokens, hkv, G, ctx),
                     kernels::DenseAttentionSplitKvWorkspaceBytes(split));
  }
  if (bytes <= attention_workspace_.bytes()) return absl::OkStatus();
  if (stream_ != nullptr) NEEDLE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  DropGraphs();
  return attention_workspace_.Allocate(bytes, "the attention workspace");
}

kernels::PagedPool CudaExecutor::KPool(Pool p, int layer) const {
  const DevicePool& d = pools_[Index(p)];
  kernels::PagedPool pool;
  pool.base = d.k.as<bf16>();
  pool.page_stride = d.k_page_stride;
  pool.layer = layer;
  pool.num_kv_heads = model_.num_kv_heads;
  pool.rows_per_page = d.rows;
  pool.head_dim = model_.head_dim_qk;
  return pool;
}

kernels::PagedPool CudaExecutor::VPool(Pool p, int layer) const {
  const DevicePool& d = pools_[Index(p)];
  kernels::PagedPool pool;
  pool.base = d.v.as<bf16>();
  pool.page_stride = d.v_page_stride;
  pool.layer = layer;
  pool.num_kv_heads = model_.num_kv_heads;
  pool.rows_per_page = d.rows;
  pool.head_dim = model_.head_dim_v;
  return pool;
}

kernels::PagedKvCache CudaExecutor::Cache(Pool p, int layer, const StepPlanLayout& sp, int seq0) const {
  const DevicePool& d = pools_[Index(p)];
  const int64_t layer_rows = static_cast<int64_t>(layer) * model_.num_kv_heads * d.rows;
  kernels::PagedKvCache c;
  c.k = d.k.as<const bf16>() + layer_rows * model_.head_dim_qk;
  c.v = d.v.as<const bf16>() + layer_rows * model_.head_dim_v;
  c.k_page_stride = d.k_page_stride;
  c.v_page_stride = d.v_page_stride;
  c.page_table = Plan<const int32_t>(sp.tables[Index(p)]) + static_cast<int64_t>(seq0) * sp.table_stride[Index(p)];
  c.table_stride = sp.table_stride[Index(p)];
  c.page_rows = d.rows;
  c.ring_pages = p == Pool::kWindow ? geo_.layout.window_ring_pages : 0;
  c.num_pages = d.pages;
  return c;
}

absl::Status CudaExecutor::Gemm(int64_t rows, int64_t in, int64_t out, const bf16* x, int64_t x_stride,
                                const bf16* w, const bf16* bias, void* y, int64_t y_stride,
                                kernels::GemmOutput y_type, bool accumulate) {
  kernels::GemmParams p;
  p.rows = rows;
  p.in = in;
  p.out = out;
  p.x = x;
  p.x_stride = x_stride;
  p.w = w;
  p.w_stride = in;
  p.bias = bias;
  p.y = y;
  p.y_stride = y_stride;
  p.y_type = y_type;
  p.accumulate = accumulate;
  NEEDLE_CUDA_RETURN_IF_ERROR(
      kernels::LaunchGemm(cublas_, p, gemm_workspace_.get(), gemm_workspace_.bytes(), stream_));
  return absl::OkStatus();
}

namespace {

// An NVTX range around one step, "needle.decode" when every sequence decodes one token and
// "needle.step" otherwise, so that a profiler can pick out the decode steps (for example
// `ncu --nvtx --nvtx-include "needle.decode/"`). Header-only NVTX: without a tool attached a push or
// pop is a check of a null function pointer.
class StepRange {
 public:
  explicit StepRange(const StepPlan& plan) {
    const bool decode = std::all_of(plan.seqs.begin(), plan.seqs.end(),
                                    [](const SeqStep& s) { return s.tokens.size() == 1; });
    nvtxRangePushA(decode ? "needle.decode" : "needle.step");
  }
  ~StepRange() { nvtxRangePop(); }
  StepRange(const StepRange&) = delete;
  StepRange& operator=(const StepRange&) = delete;
};

}  // namespace

absl::Status CudaExecutor::Run(const StepPlan& plan, StepOutput* out) {
  const StepRange range(plan);
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaSetDevice(config_.device));
  DecodePadding pad;
  if (GraphPaddingFor(plan, &pad)) {
    const auto it = graphs_.find(GraphKey{pad.num_seqs, pad.num_items});
    if (it == graphs_.end() || !it->second.failed) {
      // A step the padded layout refuses is refused (with its proper status) by the eager path.
      absl::StatusOr<StepPlanLayout> sp = LayoutStepPlan(plan, geo_, &pad);
      if (sp.ok()) {
        bool ran = false;
        NEEDLE_RETURN_IF_ERROR(RunGraph(plan, *sp, out, &ran));
        if (ran) return absl::OkStatus();
      }
    }
  }
  return RunEager(plan, out);
}

bool CudaExecutor::GraphPaddingFor(const StepPlan& plan, DecodePadding* pad) const {
  if (buckets_.empty() || plan.seqs.empty() || static_cast<int64_t>(plan.seqs.size()) > buckets_.back()) return false;
  int items = 0;
  for (const SeqStep& s : plan.seqs) {
    if (s.tokens.size() != 1 || s.pages == nullptr) return false;
    for (int p = 0; p < kNumPools; ++p) {
      if (geo_.layout.has_pool[p] && static_cast<int64_t>(s.pages->table[p].size()) > graph_table_stride_[p]) {
        return false;
      }
    }
    items += CompressedCompletedAt(geo_, s.start_pos);
  }
  const int n = static_cast<int>(plan.seqs.size());
  pad->num_seqs = *std::lower_bound(buckets_.begin(), buckets_.end(), n);
  // Compressed tokens completed (0 or 1 per decode) in power-of-two buckets of their own, so that the
  // 15 of 16 batch-1 steps that complete none (paper geometry, d = 16) run no compression at all.
  int item_bucket = 0;
  if (items > 0) {
    item_bucket = 1;
    while (item_bucket < items) item_bucket *= 2;
    item_bucket = std::min(item_bucket, pad->num_seqs);
  }
  pad->num_items = item_bucket;
  std::copy(std::begin(graph_table_stride_), std::end(graph_table_stride_), pad->table_stride);
  return true;
}

absl::Status CudaExecutor::PrepareStep(const StepPlan& plan, const StepPlanLayout& sp, StepOutput* out) {
  const int64_t V = model_.vocab_size;
  out->vocab = static_cast<int>(V);
  out->first_row = sp.first_row;
  // NaN until the device's rows arrive: a row that is never copied cannot pass for a result.
  out->logits.assign(static_cast<size_t>(sp.output_rows) * V, std::numeric_limits<float>::quiet_NaN());
  if (sp.num_tokens == 0) return absl::OkStatus();

  // Nothing of an earlier (possibly failed) step may still be reading the pinned plan buffer.
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  NEEDLE_RETURN_IF_ERROR(EnsurePlanCapacity(sp.bytes));
  if (mlp_cmp_) {
    NEEDLE_RETURN_IF_ERROR(EnsureCompressWorkspace(
        kernels::CompressMlpWorkspaceBytes(sp.num_items, model_.num_kv_heads, model_.nsa.cmp_mlp_hidden)));
  }
  NEEDLE_RETURN_IF_ERROR(EnsureAttentionWorkspace(sp.num_decodes, sp.num_tokens));
  WriteStepPlan(plan, geo_, sp, plan_host_.get());
  return absl::OkStatus();
}

absl::Status CudaExecutor::RunEager(const StepPlan& plan, StepOutput* out) {
  NEEDLE_ASSIGN_OR_RETURN(StepPlanLayout sp, LayoutStepPlan(plan, geo_));
  NEEDLE_RETURN_IF_ERROR(PrepareStep(plan, sp, out));
  if (sp.num_tokens == 0) return absl::OkStatus();
  ++graph_stats_.eager_steps;
  NEEDLE_RETURN_IF_ERROR(EnqueueForward(sp));
  const int64_t V = model_.vocab_size;
  const int chunk = config_.max_logit_rows;
  for (int r0 = 0; r0 < sp.num_logit_rows; r0 += chunk) {
    const int n = std::min(chunk, sp.num_logit_rows - r0);
    NEEDLE_RETURN_IF_ERROR(WithContext(EnqueueLogitsPass(sp, r0, n), "CUDA executor, logits"));
    // Stream-ordered: the next pass's GEMM waits for this copy.
    NEEDLE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out->logits.data() + static_cast<int64_t>(r0) * V, logits_.get(),
                                                static_cast<size_t>(n) * V * sizeof(float), cudaMemcpyDeviceToHost,
                                                stream_));
  }
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaExecutor::RunGraph(const StepPlan& plan, const StepPlanLayout& sp, StepOutput* out, bool* ran) {
  *ran = false;
  NEEDLE_RETURN_IF_ERROR(PrepareStep(plan, sp, out));  // may drop every graph: look ours up after it
  const GraphKey key{sp.num_seqs, sp.num_items};
  DecodeGraph& g = graphs_[key];
  if (g.exec != nullptr && g.plan_bytes != sp.bytes) {
    // Cannot happen (the layout is a function of the key); never replay a graph that disagrees.
    cudaGraphExecDestroy(g.exec);
    g.exec = nullptr;
  }
  if (g.exec == nullptr) {
    const absl::Status captured = Capture(sp, &g.exec);
    if (!captured.ok()) {
      g.exec = nullptr;
      g.failed = true;
      ++graph_stats_.failures;
      spdlog::warn("CUDA executor: the decode step of {} sequences ({} compressed tokens) could not be captured "
                   "as a CUDA graph ({}); steps of that shape run launch by launch",
                   key.first, key.second, std::string(captured.message()));
      return absl::OkStatus();
    }
    g.plan_bytes = sp.bytes;
    ++graph_stats_.captures;
  }
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(g.exec, stream_));
  ++graph_stats_.replays;
  // Only the plan's rows; the padding rows' logits stay on the device.
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out->logits.data(), logits_.get(),
                                              static_cast<size_t>(sp.output_rows) * model_.vocab_size * sizeof(float),
                                              cudaMemcpyDeviceToHost, stream_));
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  *ran = true;
  return absl::OkStatus();
}

absl::Status CudaExecutor::Capture(const StepPlanLayout& sp, cudaGraphExec_t* exec) {
  *exec = nullptr;
  // Thread-local mode: only this thread's calls are checked for capture safety (another executor or
  // a test on another thread may allocate meanwhile), and this thread makes no unsafe ones: every
  // buffer is allocated in PrepareStep, before the capture begins, and cuBLASLt runs with the
  // explicit workspace passed to every matmul.
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  absl::Status st = EnqueueForward(sp);
  if (st.ok()) st = WithContext(EnqueueLogitsPass(sp, 0, sp.num_logit_rows), "CUDA executor, logits");
  if (st.ok() && config_.fail_graph_captures) {
    // Tests: waiting for a capturing stream is illegal and invalidates the capture, as an operation
    // the driver cannot capture would, so the real failure path runs.
    const cudaError_t err = cudaStreamSynchronize(stream_);
    st = CudaError("cudaStreamSynchronize(stream_) while capturing (fail_graph_captures)",
                   err != cudaSuccess ? err : cudaErrorUnknown);
  }
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);  // always end it, even after a failure
  if (st.ok() && ended != cudaSuccess) st = CudaError("cudaStreamEndCapture(stream_, &graph)", ended);
  if (st.ok()) {
    const cudaError_t instantiated = cudaGraphInstantiate(exec, graph, 0);
    if (instantiated != cudaSuccess) {
      *exec = nullptr;
      st = CudaError("cudaGraphInstantiate(exec, graph, 0)", instantiated);
    }
  }
  if (graph != nullptr) cudaGraphDestroy(graph);
  // Capture errors are not sticky; clear the last error so the eager run starts clean (a sticky
  // error, say a fault of an earlier step, persists and fails the eager run as INTERNAL).
  if (!st.ok()) cudaGetLastError();
  return st;
}

absl::Status CudaExecutor::EnqueueForward(const StepPlanLayout& sp) {
  NEEDLE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(plan_dev_.get(), plan_host_.get(), sp.bytes, cudaMemcpyHostToDevice, stream_));

  kernels::EmbeddingParams emb;
  emb.num_tokens = sp.num_tokens;
  emb.vocab = model_.vocab_size;
  emb.hidden = model_.hidden_size;
  emb.token_ids = Plan<const int32_t>(sp.token_ids);
  emb.table = weights_->embed();
  emb.out = x_.as<bf16>();
  emb.out_stride = model_.hidden_size;
  NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchEmbedding(emb, stream_));

  for (int layer = 0; layer < model_.num_layers; ++layer) {
    NEEDLE_RETURN_IF_ERROR(WithContext(RunLayer(layer, sp), absl::StrCat("CUDA executor, layer ", layer)));
  }
  return absl::OkStatus();
}

absl::Status CudaExecutor::RunLayer(int layer, const StepPlanLayout& sp) {
  const ModelConfig& m = model_;
  const DeviceLayer& W = weights_->layer(layer);
  const int T = sp.num_tokens, nd = sp.num_decodes, ns = sp.num_seqs;
  const int64_t D = m.hidden_size, H = m.num_heads, Hkv = m.num_kv_heads, dk = m.head_dim_qk, dv = m.head_dim_v;
  const int64_t I = m.intermediate_size;
  const int64_t kw = Hkv * dk;  // width of one token's K row
  bf16* x = x_.as<bf16>();
  bf16* xn = xn_.as<bf16>();
  bf16* q = q_.as<bf16>();
  bf16* attn = attn_.as<bf16>();
  bf16* mlp = mlp_.as<bf16>();
  float* gates = gates_.as<float>();

  // Pre-attention RMSNorm.
  kernels::RmsNormParams norm;
  norm.num_rows = T;
  norm.hidden = static_cast<int>(D);
  norm.eps = m.norm_eps;
  norm.x = x;
  norm.x_stride = D;
  norm.weight = W.attn_norm;
  norm.y = xn;
  norm.y_stride = D;
  NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchRmsNorm(norm, stream_));

  // Projections: q on its own (the attention kernels read it as contiguous [H][d_k] rows), then one GEMM
  // for the gate logits and every used branch's K/V. Each of those is a column range of proj_'s rows,
  // so everything below reads it with row stride pw.
  NEEDLE_RETURN_IF_ERROR(Gemm(T, D, H * dk, xn, D, W.q_proj, W.q_bias, q, H * dk, kernels::GemmOutput::kBf16, false));
  const int64_t pw = fused_.width;
  bf16* proj = proj_.as<bf16>();
  NEEDLE_RETURN_IF_ERROR(
      Gemm(T, D, pw, xn, D, W.fused_proj, W.fused_bias, proj, pw, kernels::GemmOutput::kBf16, false));
  auto part = [&](int64_t col) { return col >= 0 ? proj + col : nullptr; };
  bf16* k_slc = part(fused_.k[kSlc]);
  bf16* v_slc = part(fused_.v[kSlc]);
  bf16* k_win = part(fused_.k[kWin]);
  bf16* v_win = part(fused_.v[kWin]);
  const bf16* k_cmp = part(fused_.k[kCmp]);
  const bf16* v_cmp = part(fused_.v[kCmp]);
  if (nsa_) {
    kernels::GateSigmoidParams g;
    g.num_tokens = T;
    g.num_heads = static_cast<int>(H);
    g.logits = part(fused_.gate);
    g.logits_stride = pw;
    g.gates = gates;
    NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchGateSigmoid(g, stream_));
  }

  // RoPE: q and the selection keys in one launch, with the window keys (independent K/V) as further
  // heads when the fused layout puts them right after the selection keys, else in a second launch.
  // The MLP compression's cmp keys stay pre-RoPE.
  kernels::RopeParams rope;
  rope.num_tokens = T;
  rope.head_dim = static_cast<int>(dk);
  rope.theta = m.rope_theta;
  rope.q = q;
  rope.q_stride = H * dk;
  rope.num_q_heads = static_cast<int>(H);
  rope.k = k_slc;
  rope.k_stride = pw;
  rope.num_k_heads = static_cast<int>(Hkv);
  rope.positions = Plan<const int32_t>(sp.positions);
  const bool win_adjacent = win_pool_ && k_win == k_slc + kw;
  if (win_adjacent) rope.num_k_heads = static_cast<int>(2 * Hkv);
  NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchRope(rope, stream_));
  if (win_pool_ && !win_adjacent) {
    rope.q = nullptr;
    rope.num_q_heads = 0;
    rope.k = k_win;
    NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchRope(rope, stream_));
  }

  // Selection cache (the whole cache of a dense model).
  kernels::KvAppendParams app;
  app.num_tokens = T;
  app.k = k_slc;
  app.k_stride = pw;
  app.v = v_slc;
  app.v_stride = pw;
  app.slots = Plan<const int64_t>(sp.sel_slots);
  app.k_pool = KPool(Pool::kSelection, layer);
  app.v_pool = VPool(Pool::kSelection, layer);
  NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchKvAppend(app, stream_));

  // Window-ring rows of single-token decodes, which the decode kernel reads from the ring.
  kernels::KvAppendParams win_app;
  if (win_pool_) {
    win_app.k_stride = pw;
    win_app.v_stride = pw;
    win_app.k_pool = KPool(Pool::kWindow, layer);
    win_app.v_pool = VPool(Pool::kWindow, layer);
    if (nd > 0) {
      win_app.num_tokens = nd;
      win_app.k = k_win;
      win_app.v = v_win;
      win_app.slots = Plan<const int64_t>(sp.win_slots);
      NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchKvAppend(win_app, stream_));
    }
  }

  // Compressed tokens completed in this step.
  if (nsa_ && sp.num_items > 0) {
    kernels::CompressSource src;
    const Pool src_pool = mlp_cmp_ ? Pool::kStaging : Pool::kSelection;
    src.k_pool = KPool(src_pool, layer);
    src.v_pool = VPool(src_pool, layer);
    src.page_table = Plan<const int32_t>(sp.tables[Index(src_pool)]);
    if (mlp_cmp_) {
      src.ring_pages = 1;
      src.k_tail = k_cmp;
      src.k_tail_stride = pw;
      src.v_tail = v_cmp;
      src.v_tail_stride = pw;
      kernels::CompressMlpParams c;
      c.num_items = sp.num_items;
      c.items = Plan<const kernels::CompressItem>(sp.items);
      c.block_len = m.nsa.cmp_block;
      c.hidden = m.nsa.cmp_mlp_hidden;
      c.rope_theta = m.rope_theta;
      c.src = src;
      c.k_dst = KPool(Pool::kCompressed, layer);
      c.v_dst = VPool(Pool::kCompressed, layer);
      c.k_pos = W.cmp_k_pos;
      c.k_fc1 = W.cmp_k_fc1;
      c.k_fc2 = W.cmp_k_fc2;
      c.v_pos = W.cmp_v_pos;
      c.v_fc1 = W.cmp_v_fc1;
      c.v_fc2 = W.cmp_v_fc2;
      NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchCompressMlp(c, compress_workspace_.get(), stream_));
    } else {
      kernels::CompressMeanParams c;
      c.num_items = sp.num_items;
      c.items = Plan<const kernels::CompressItem>(sp.items);
      c.block_len = m.nsa.cmp_block;
      c.src = src;
      c.k_dst = KPool(Pool::kCompressed, layer);
      c.v_dst = VPool(Pool::kCompressed, layer);
      NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchCompressMean(c, stream_));
    }
  }

  // Attention.
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dk)));
  if (!nsa_) {
    kernels::DenseAttentionParams a;
    a.q = q;
    a.out = attn;
    a.cu_tokens = Plan<const int32_t>(sp.cu_tokens);
    a.start_pos = Plan<const int32_t>(sp.start_pos);
    a.num_seqs = ns;
    a.num_tokens = T;
    a.num_heads = static_cast<int>(H);
    a.num_kv_heads = static_cast<int>(Hkv);
    a.head_dim_qk = static_cast<int>(dk);
    a.head_dim_v = static_cast<int>(dv);
    a.softmax_scale = scale;
    a.kv = Cache(Pool::kSelection, layer, sp, 0);
    if (nd == ns) {
      // Every sequence decodes one token: the split-KV decode path (start_pos = the positions).
      a.cu_tokens = nullptr;
      a.max_context = static_cast<int>(config_.max_context);
      NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchDenseAttention(a, attention_workspace_.get(),
                                                                attention_workspace_.bytes(), stream_));
    } else {
      NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchDenseAttention(a, attention_workspace_.get(), stream_));
    }
  } else {
    const kernels::NsaKernelGeometry geometry = KernelGeometry(m.nsa);
    if (nd > 0) {
      kernels::NsaDecodeParams a;
      a.q = q;
      a.gates = gates;
      a.gate_dtype = kernels::GateDType::kFp32;
      a.out = attn;
      a.positions = Plan<const int32_t>(sp.positions);
      a.num_seqs = nd;
      a.num_heads = static_cast<int>(H);
      a.num_kv_heads = static_cast<int>(Hkv);
      a.head_dim_qk = static_cast<int>(dk);
      a.head_dim_v = static_cast<int>(dv);
      a.max_context = static_cast<int>(config_.max_context);
      a.softmax_scale = scale;
      a.geometry = geometry;
      a.compressed = Cache(Pool::kCompressed, layer, sp, 0);
      a.selection = Cache(Pool::kSelection, layer, sp, 0);
      if (win_pool_) a.window = Cache(Pool::kWindow, layer, sp, 0);
      a.shared_kv = !win_pool_;
      NEEDLE_CUDA_RETURN_IF_ERROR(
          kernels::LaunchNsaDecode(a, attention_workspace_.get(), attention_workspace_.bytes(), stream_));
    }
    if (nd < ns) {
      kernels::NsaPrefillParams a;
      a.q = q + static_cast<int64_t>(nd) * H * dk;
      a.gates = gates + static_cast<int64_t>(nd) * H * 3;
      a.gate_dtype = kernels::GateDType::kFp32;
      a.out = attn + static_cast<int64_t>(nd) * H * dv;
      a.cu_tokens = Plan<const int32_t>(sp.prefill_cu_tokens);
      a.start_pos = Plan<const int32_t>(sp.start_pos) + nd;
      a.num_seqs = ns - nd;
      a.num_tokens = T - nd;
      a.num_heads = static_cast<int>(H);
      a.num_kv_heads = static_cast<int>(Hkv);
      a.head_dim_qk = static_cast<int>(dk);
      a.head_dim_v = static_cast<int>(dv);
      // The chunks' own bound, not the executor's: the tensor-core prefill keeps G x (blocks up to it)
      // block masses on chip when they fit and attends the compressed branch twice when they do not.
      a.max_context = static_cast<int>(sp.max_prefill_end);
      a.softmax_scale = scale;
      a.geometry = geometry;
      a.compressed = Cache(Pool::kCompressed, layer, sp, nd);
      a.selection = Cache(Pool::kSelection, layer, sp, nd);
      if (win_pool_) {
        a.window = Cache(Pool::kWindow, layer, sp, nd);
        a.window_k_chunk = k_win + static_cast<int64_t>(nd) * pw;
        a.window_v_chunk = v_win + static_cast<int64_t>(nd) * pw;
        a.window_k_chunk_stride = pw;
        a.window_v_chunk_stride = pw;
      }
      a.shared_kv = !win_pool_;
      NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchNsaPrefill(a, attention_workspace_.get(), stream_));
    }
  }

  // Ring writes after attention: the prefill chunks' window rows, every token's staging rows.
  if (win_pool_ && nd < T) {
    win_app.num_tokens = T - nd;
    win_app.k = k_win + static_cast<int64_t>(nd) * pw;
    win_app.v = v_win + static_cast<int64_t>(nd) * pw;
    win_app.slots = Plan<const int64_t>(sp.win_slots) + nd;
    NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchKvAppend(win_app, stream_));
  }
  if (mlp_cmp_) {
    kernels::KvAppendParams stg;
    stg.num_tokens = T;
    stg.k = k_cmp;
    stg.k_stride = pw;
    stg.v = v_cmp;
    stg.v_stride = pw;
    stg.slots = Plan<const int64_t>(sp.stg_slots);
    stg.k_pool = KPool(Pool::kStaging, layer);
    stg.v_pool = VPool(Pool::kStaging, layer);
    NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchKvAppend(stg, stream_));
  }

  // Output projection into the residual, then the MLP.
  NEEDLE_RETURN_IF_ERROR(Gemm(T, H * dv, D, attn, H * dv, W.o_proj, nullptr, x, D, kernels::GemmOutput::kBf16, true));
  norm.weight = W.mlp_norm;
  NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchRmsNorm(norm, stream_));
  NEEDLE_RETURN_IF_ERROR(Gemm(T, D, 2 * I, xn, D, W.gate_up, nullptr, mlp, 2 * I, kernels::GemmOutput::kBf16, false));
  kernels::SwiGluParams act;
  act.num_tokens = T;
  act.width = static_cast<int>(I);
  act.gate = mlp;
  act.gate_stride = 2 * I;
  act.up = mlp + I;
  act.up_stride = 2 * I;
  act.out = mlp;
  act.out_stride = 2 * I;
  NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchSwiGlu(act, stream_));
  NEEDLE_RETURN_IF_ERROR(Gemm(T, I, D, mlp, 2 * I, W.down_proj, nullptr, x, D, kernels::GemmOutput::kBf16, true));
  return absl::OkStatus();
}

absl::Status CudaExecutor::EnqueueLogitsPass(const StepPlanLayout& sp, int r0, int n) {
  const int64_t D = model_.hidden_size, V = model_.vocab_size;
  kernels::RmsNormParams norm;
  norm.num_rows = n;
  norm.hidden = static_cast<int>(D);
  norm.eps = model_.norm_eps;
  norm.x = x_.as<const bf16>();
  norm.x_stride = D;
  norm.weight = weights_->final_norm();
  norm.row_index = Plan<const int32_t>(sp.logit_rows) + r0;
  norm.y = xn_.as<bf16>();
  norm.y_stride = D;
  NEEDLE_CUDA_RETURN_IF_ERROR(kernels::LaunchRmsNorm(norm, stream_));
  return Gemm(n, D, V, xn_.as<const bf16>(), D, weights_->lm_head(), nullptr, logits_.get(), V,
              kernels::GemmOutput::kFp32, false);
}

}  // namespace needle::engine::cuda
