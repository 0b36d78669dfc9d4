// Registration of the CUDA executor with the engine builder (backend "cuda", and "auto" when a device
// is present). Programs linked with needle_engine_cuda call RegisterCudaBackend() once in main(),
// under #ifdef NEEDLE_HAVE_CUDA (the library exports that definition to whoever links it). Owns no
// state beyond the registration itself.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "engine/model_config.h"

namespace needle::engine::cuda {

// Options of the executors the "cuda" backend builds.
struct CudaBackendOptions {
  bool cuda_graphs = true;  // CudaExecutorConfig::cuda_graphs (flag --cuda_graphs)
};

// Registers "cuda": the CudaExecutor on device 0, K/V pools sized at 2 bytes per element (bf16).
void RegisterCudaBackend(const CudaBackendOptions& options = {});

// Whether at least one CUDA device is usable (clears the error when there is none).
bool CudaDeviceAvailable();

// Device bytes left for the KV pools on device 0: free memory minus the model's bf16 weights, the
// executor's fixed buffers for these limits, and a margin for the CUDA context and libraries.
absl::StatusOr<int64_t> CudaKvMemory(const ModelConfig& model, int max_tokens_per_step, int max_seqs_per_step);

}  // namespace needle::engine::cuda
