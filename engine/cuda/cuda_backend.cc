// The "cuda" backend's factory, device probe and memory query; see cuda_backend.h.
#include "engine/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "engine/builder.h"
#include "engine/cuda/cuda_executor.h"
#include "engine/cuda/cuda_status.h"
#include "engine/cuda/device_weights.h"
#include "kernels/gemm.h"

namespace needle::engine::cuda {
namespace {

// Headroom for what the estimate does not count: the CUDA context, cuBLASLt's own allocations,
// kernel images, fragmentation.
constexpr int64_t kMarginBytes = int64_t{512} << 20;

// The CudaExecutor's activation buffers for these limits (its Init allocates exactly these, plus the
// step plan and compression workspace, which are small and covered by the margin).
int64_t ActivationBytes(const ModelConfig& m, int max_tokens, int max_seqs) {
  const int64_t T = max_tokens, D = m.hidden_size, H = m.num_heads;
  const int64_t dk = m.head_dim_qk, dv = m.head_dim_v, I = m.intermediate_size;
  // x, xn, q, attention output, gate|up, and the fused projection's gate logits and branch K/V.
  int64_t elems = T * (2 * D + H * dk + H * dv + 2 * I + FusedProjection::For(m).width);
  if (m.IsNsa()) elems += T * 3 * H * 2;  // fp32 gates
  return elems * 2 + int64_t{max_seqs} * m.vocab_size * 4 + static_cast<int64_t>(kernels::GemmWorkspaceBytes());
}

}  // namespace

bool CudaDeviceAvailable() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

absl::StatusOr<int64_t> CudaKvMemory(const ModelConfig& model, int max_tokens_per_step, int max_seqs_per_step) {
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  size_t free_bytes = 0, total_bytes = 0;
  NEEDLE_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  const int64_t need =
      DeviceWeightBytes(model) + ActivationBytes(model, max_tokens_per_step, max_seqs_per_step) + kMarginBytes;
  const int64_t left = static_cast<int64_t>(free_bytes) - need;
  if (left <= 0) {
    return absl::ResourceExhaustedError(absl::StrCat("the device has ", free_bytes, " bytes free; the weights and ",
                                                     "buffers of this model need about ", need));
  }
  return left;
}

void RegisterCudaBackend(const CudaBackendOptions& options) {
  ExecutorFactory factory = [options](std::shared_ptr<const ModelWeights> weights, const KvCacheConfig& cache,
                                      const ExecutorLimits& limits) -> absl::StatusOr<std::unique_ptr<Executor>> {
    CudaExecutorConfig config;
    config.max_tokens_per_step = limits.max_tokens_per_step;
    config.max_seqs_per_step = limits.max_seqs_per_step;
    config.max_context = limits.max_context;
    config.cuda_graphs = options.cuda_graphs;
    absl::StatusOr<std::unique_ptr<CudaExecutor>> e = CudaExecutor::Create(*weights, cache, config);
    if (!e.ok()) return e.status();
    return std::unique_ptr<Executor>(std::move(e).value());
  };
  KvMemoryQuery kv_memory = [](const ModelConfig& model, const ExecutorLimits& limits) {
    return CudaKvMemory(model, limits.max_tokens_per_step, limits.max_seqs_per_step);
  };
  RegisterBackend("cuda", std::move(factory), /*kv_elem_bytes=*/2, CudaDeviceAvailable, std::move(kv_memory));
}

}  // namespace needle::engine::cuda
