// Assembles an Engine: model, KV pools, executor. The CUDA executor is linked in only when needle is
// built with CUDA (NEEDLE_HAVE_CUDA); otherwise asking for it is a clear error.
#include "engine/builder.h"

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
  if (page_tokens < 0) return absl::InvalidArgumentError("page_tokens must be >= 0");
  if (max_seq_tokens < 0) return absl::InvalidArgumentError("max_seq_tokens must be >= 0");
  return engine.Validate();
}

namespace {

int NaturalPageTokens(const ModelConfig& m) {
  if (!m.IsNsa()) return 64;
  const int l = m.nsa.sel_block;
  return l >= 64 ? l : ((64 + l - 1) / l) * l;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> BuildEngine(const EngineOptions& o) {
  NEEDLE_RETURN_IF_ERROR(o.Validate());
  std::string backend = o.backend;
  if (backend == "auto") backend = "cpu";  // the CUDA executor registers itself here once built
  if (backend != "cpu") {
    return absl::UnimplementedError(absl::StrCat("backend \"", backend, "\" is not available in this build"));
  }
  NEEDLE_ASSIGN_OR_RETURN(ModelWeights w, LoadModel(o.model, o.model_seed));
  auto weights = std::make_shared<const ModelWeights>(std::move(w));
  const ModelConfig& m = weights->config;
  const int page = o.page_tokens > 0 ? o.page_tokens : NaturalPageTokens(m);
  const int64_t max_seq = o.max_seq_tokens > 0 ? o.max_seq_tokens : m.max_position_embeddings;
  KvCacheConfig cache = SizePools(m, o.kv_cache_bytes, /*elem_bytes=*/4, max_seq, page);
  cache.shuffle_seed = o.kv_shuffle_seed;
  NEEDLE_RETURN_IF_ERROR(cache.Validate(m));
  auto executor = std::make_unique<CpuExecutor>(*weights, cache);
  return Engine::Create(std::move(weights), std::move(executor), cache, o.engine);
}

}  // namespace needle::engine
