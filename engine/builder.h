// Builds a ready Engine from user-facing options: loads the model (preset or checkpoint directory),
// sizes the KV pools, picks the executor for the backend. The one place the server, needle-generate
// and the tests assemble an engine, so they all run the same path.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"

namespace needle::engine {

struct EngineOptions {
  std::string model = "demo";  // preset name or checkpoint directory
  uint64_t model_seed = 0;     // seed of a synthetic preset's weights
  std::string backend = "cpu"; // cpu | cuda | auto (cuda when a device is present)
  int64_t kv_cache_bytes = 256ll << 20;  // total bytes of all KV pools
  int page_tokens = 0;         // 0: the model's natural page size (max(64, l') rounded to l')
  int64_t max_seq_tokens = 0;  // 0: the model's max_position_embeddings
  uint64_t kv_shuffle_seed = 0;  // non-zero: permute physical pages (tests)
  EngineConfig engine;

  absl::Status Validate() const;
};

absl::StatusOr<std::unique_ptr<Engine>> BuildEngine(const EngineOptions& options);

}  // namespace needle::engine
