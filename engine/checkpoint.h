// Loading and writing whole model checkpoints: a Hugging Face style directory with config.json and
// safetensors weights (single file or sharded). Owns the mapping between TensorSpecs(config) and the
// files' tensors: presence, shape and dtype checks, conversion to fp32 ModelWeights, and the reverse.
// Does not parse safetensors itself (engine/safetensors.h) nor know any architecture's names
// (engine/weights.h).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/safetensors.h"
#include "engine/weights.h"

namespace needle::engine {

// Reads dir/config.json and every tensor TensorSpecs(config) lists, converting BF16/F16/F32 to fp32.
// Errors: a missing tensor is NOT_FOUND naming the tensor and the directory; a wrong shape or a
// non-float dtype is INVALID_ARGUMENT naming the tensor, its file, and expected and actual values.
// Tensors the architecture does not use are skipped and counted (debug log on logger "engine").
absl::StatusOr<ModelWeights> LoadCheckpoint(const std::string& dir);

// Writes dir/config.json (ModelConfigToJson) and w's tensors in TensorSpecs order as `dtype` (kBF16,
// kF16 or kF32; round-to-nearest-even), into one model.safetensors when max_shard_bytes is 0, else
// shards of at most max_shard_bytes (a larger tensor gets its own) with model.safetensors.index.json.
// config.json is written last, so a directory with a config.json holds complete weights. Every slot
// of w must have exactly its spec's shape.
absl::Status WriteCheckpoint(const std::string& dir, const ModelWeights& w, DType dtype,
                             int64_t max_shard_bytes);

// Writes dir/config.json for `config` (through a temporary file and a rename).
absl::Status WriteConfigJson(const std::string& dir, const ModelConfig& config);

// Sum of the element counts of TensorSpecs(config).
int64_t ParameterCount(const ModelConfig& config);

}  // namespace needle::engine
