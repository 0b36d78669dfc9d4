// Assembles an Engine: model, KV pools, executor. The CPU executor is built in; device executors are
// registered by the program (RegisterBackend), so asking for one that is not registered, or whose
// device is missing, is a clear error rather than a link-time dependency.
#include "engine/builder.h"

#include <algorithm>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"
#include "engine/cpu_executor.h"
#include "engine/presets.h"
#include "spdlog/spdlog.h"

namespace needle::engine {

absl::Status EngineOptions::Validate() const {
  if (model.empty()) return absl::InvalidArgumentError("--model must not be empty");
  if (backend != "cpu" && backend != "cuda" && backend != "auto") {
    return absl::InvalidArgumentError(absl::StrCat("--backend must be cpu, cuda or auto, got \"", backend, "\""));
  }
  if (kv_cache_bytes <= 0) return absl::InvalidArgumentError("--kv_cache_bytes must be positive");
  if (!(kv_cache_fraction >= 0 && kv_cache_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--kv_cache_fraction must be in [0, 1], got ", kv_cache_fraction));
  }
  if (page_tokens < 0) return absl::InvalidArgumentError("page_tokens must be >= 0");
  if (max_seq_tokens < 0) return absl::InvalidArgumentError("max_seq_tokens must be >= 0");
  return engine.Validate();
}

namespace {

struct Backend {
  ExecutorFactory create;
  int kv_elem_bytes = 4;
  std::function<bool()> available;
  KvMemoryQuery kv_memory;
};

std::mutex& RegistryMutex() {
  static std::mutex* mu = new std::mutex;
  return *mu;
}

std::map<std::string, Backend>& Registry() {
  static auto* registry = new std::map<std::string, Backend>;
  return *registry;
}

// Copies the registered backend `name` into *out; false when there is none.
bool FindBackend(const std::string& name, Backend* out) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  auto it = Registry().find(name);
  if (it == Registry().end()) return false;
  *out = it->second;
  return true;
}

int NaturalPageTokens(const ModelConfig& m) {
  if (!m.IsNsa()) return 64;
  const int l = m.nsa.sel_block;
  return l >= 64 ? l : ((64 + l - 1) / l) * l;
}

}  // namespace

void RegisterBackend(std::string name, ExecutorFactory factory, int kv_elem_bytes, std::function<bool()> available,
                     KvMemoryQuery kv_memory) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Registry()[std::move(name)] = Backend{std::move(factory), kv_elem_bytes, std::move(available), std::move(kv_memory)};
}

absl::StatusOr<std::unique_ptr<Engine>> BuildEngine(const EngineOptions& o) {
  NEEDLE_RETURN_IF_ERROR(o.Validate());
  // Resolve the backend before loading a (possibly large) model.
  Backend device;
  bool use_device = false;
  if (o.backend == "cuda") {
    if (!FindBackend("cuda", &device)) {
      return absl::UnimplementedError(
          "backend \"cuda\": this build has no CUDA backend (built without CUDA, or the program did not register it)");
    }
    if (device.available && !device.available()) {
      return absl::FailedPreconditionError("backend \"cuda\": no CUDA device is available");
    }
    use_device = true;
  } else if (o.backend == "auto") {
    use_device = FindBackend("cuda", &device) && (!device.available || device.available());
  }
  if (o.kv_cache_fraction > 0 && (!use_device || !device.kv_memory)) {
    return absl::InvalidArgumentError(
        "--kv_cache_fraction needs a device backend; the cpu backend is sized with --kv_cache_bytes");
  }

  NEEDLE_ASSIGN_OR_RETURN(ModelWeights w, LoadModel(o.model, o.model_seed));
  auto weights = std::make_shared<const ModelWeights>(std::move(w));
  const ModelConfig& m = weights->config;
  const int page = o.page_tokens > 0 ? o.page_tokens : NaturalPageTokens(m);
  const int64_t max_seq = o.max_seq_tokens > 0 ? o.max_seq_tokens : m.max_position_embeddings;
  ExecutorLimits limits;
  limits.max_tokens_per_step = o.engine.step_token_budget;
  limits.max_seqs_per_step = o.engine.max_batch;
  limits.max_context = std::max<int64_t>(max_seq, m.max_position_embeddings);

  int64_t kv_bytes = o.kv_cache_bytes;
  if (o.kv_cache_fraction > 0) {
    NEEDLE_ASSIGN_OR_RETURN(const int64_t available, device.kv_memory(m, limits));
    kv_bytes = static_cast<int64_t>(o.kv_cache_fraction * static_cast<double>(available));
    if (kv_bytes <= 0) {
      return absl::ResourceExhaustedError(absl::StrCat("--kv_cache_fraction ", o.kv_cache_fraction, " of ", available,
                                                       " free device bytes leaves no room for a KV cache"));
    }
  }
  const int elem_bytes = use_device ? device.kv_elem_bytes : 4;
  KvCacheConfig cache = SizePools(m, kv_bytes, elem_bytes, max_seq, page, o.engine.max_batch);
  cache.shuffle_seed = o.kv_shuffle_seed;
  NEEDLE_RETURN_IF_ERROR(cache.Validate(m));
  // SizePools gives one whole sequence even when the budget is smaller; a server must not take
  // more memory than it was given, so that is a configuration error here.
  if (const int64_t need = PoolBytes(m, cache, elem_bytes); need > kv_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the KV cache budget of ", kv_bytes, " bytes cannot hold one sequence of ", max_seq, " tokens (", need,
        " bytes with this model): raise --kv_cache_bytes", use_device ? " or --kv_cache_fraction" : "",
        ", or lower --max_seq_tokens"));
  }
  std::unique_ptr<Executor> executor;
  if (use_device) {
    NEEDLE_ASSIGN_OR_RETURN(executor, device.create(weights, cache, limits));
  } else {
    executor = std::make_unique<CpuExecutor>(*weights, cache);
  }
  return Engine::Create(std::move(weights), std::move(executor), cache, o.engine);
}

}  // namespace needle::engine
