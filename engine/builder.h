// Builds a ready Engine from user-facing options: loads the model (preset or checkpoint directory),
// sizes the KV pools, picks the executor for the backend. The one place the server, needle-generate
// and the tests assemble an engine, so they all run the same path.
//
// Backends other than "cpu" register themselves at start-up (RegisterBackend), so that needle_engine
// never depends on a device library: a program linked with needle_engine_cuda calls
// needle::engine::cuda::RegisterCudaBackend() in main() (under #ifdef NEEDLE_HAVE_CUDA).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "engine/executor.h"
#include "engine/kv_cache.h"
#include "engine/weights.h"

namespace needle::engine {

struct EngineOptions {
  std::string model = "demo";  // preset name or checkpoint directory
  uint64_t model_seed = 0;     // seed of a synthetic preset's weights
  std::string backend = "cpu"; // cpu | cuda | auto (cuda when registered and a device is present)
  int64_t kv_cache_bytes = 256ll << 20;  // total bytes of all KV pools
  // > 0 (device backends only): size the pools as this fraction of the device memory that is free
  // once the weights and the executor's fixed buffers are accounted for; kv_cache_bytes is then
  // ignored. 0: use kv_cache_bytes.
  double kv_cache_fraction = 0;
  int page_tokens = 0;         // 0: the model's natural page size (max(64, l') rounded to l')
  int64_t max_seq_tokens = 0;  // 0: the model's max_position_embeddings
  uint64_t kv_shuffle_seed = 0;  // non-zero: permute physical pages (tests)
  EngineConfig engine;

  absl::Status Validate() const;
};

absl::StatusOr<std::unique_ptr<Engine>> BuildEngine(const EngineOptions& options);

// ---- Backend registration ----

// What an executor must be able to serve: the engine's step limits.
struct ExecutorLimits {
  int max_tokens_per_step = 2048;  // EngineConfig::step_token_budget
  int max_seqs_per_step = 32;      // EngineConfig::max_batch
  int64_t max_context = 0;         // positions stay below this
};

using ExecutorFactory = std::function<absl::StatusOr<std::unique_ptr<Executor>>(
    std::shared_ptr<const ModelWeights> weights, const KvCacheConfig& cache, const ExecutorLimits& limits)>;

// Device bytes the KV pools may take in all (before kv_cache_fraction), for a model and limits.
using KvMemoryQuery = std::function<absl::StatusOr<int64_t>(const ModelConfig& model, const ExecutorLimits& limits)>;

// Registers (or replaces) backend `name`. `kv_elem_bytes`: bytes of one cached K/V element (sizes the
// pools); `available`: whether the backend can run here now (a device is present); `kv_memory`
// (optional): what kv_cache_fraction is a fraction of. Thread-safe; call from main().
void RegisterBackend(std::string name, ExecutorFactory factory, int kv_elem_bytes, std::function<bool()> available,
                     KvMemoryQuery kv_memory = nullptr);

}  // namespace needle::engine
