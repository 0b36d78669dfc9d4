// Built-in synthetic models: named configurations plus weights generated deterministically from a
// seed, so that tests, the demo and benchmarks need no downloaded checkpoint. Owns the preset table,
// the generator (splitmix64 + Box-Muller, bit-for-bit reproducible: no std:: distributions) and the
// initialisation rules; also LoadModel, which resolves a directory or a preset name. Must not hold
// more than one generated tensor at a time when writing (the benchmark presets are ~3B parameters).
//
// Every generated value is rounded to bf16, so an fp32 CPU executor and a bf16 GPU executor see
// identical weights, and a checkpoint written as bf16 (or fp16 for the small values here, or fp32)
// loads back bit-identical.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/model_config.h"
#include "engine/safetensors.h"
#include "engine/weights.h"

namespace needle::engine {

// Every preset name, in display order (tiny models first, then the benchmark presets).
std::vector<std::string> PresetNames();
// One line: what the preset is for.
absl::StatusOr<std::string> PresetDescription(absl::string_view name);
// The configuration, as ModelConfigFromJson produces it from the preset's config.json.
absl::StatusOr<ModelConfig> PresetConfig(absl::string_view name);

// ---- The generator ----

// The splitmix64 output function (Steele, Lea, Flood 2014).
uint64_t SplitMix64Mix(uint64_t z);
// Output k (0-based) of splitmix64 seeded with `state`: Mix(state + (k + 1) * 0x9E3779B97F4A7C15).
// Counter-based, so any element of a stream can be computed directly (and in parallel).
uint64_t SplitMix64At(uint64_t state, uint64_t k);
// The stream of one tensor: Mix(Mix(seed) ^ FNV-1a-64(name)).
uint64_t TensorStream(uint64_t seed, absl::string_view name);
// The i-th standard normal of a stream. Pair p = i / 2 uses uniforms u1 = U(2p), u2 = U(2p + 1) with
// U(k) = ((SplitMix64At(stream, k) >> 11) + 0.5) * 2^-53 in (0, 1); r = sqrt(-2 ln u1),
// value 2p = r cos(2 pi u2), value 2p + 1 = r sin(2 pi u2).
double StandardNormalAt(uint64_t stream, uint64_t i);

// How a tensor is initialised: value = RoundToBf16(float(mean + std * z)), z standard normal.
struct InitRule {
  double mean = 0.0;
  double std = 1.0;
};
// By name and shape: embeddings N(0, 1); norm weights 1 + 0.1 N(0, 1); q/k/v biases and the
// compression position embeddings 0.1 N(0, 1); every other [out, in] weight N(0, 1/in), with o_proj
// and down_proj further scaled by 1/sqrt(2 * num_layers) (residual branches).
InitRule InitRuleFor(const ModelConfig& config, const TensorSpec& spec);

// Tensor `spec` of a model generated from `seed`; depends only on (seed, spec.name, rule, shape).
Tensor GenerateTensor(const ModelConfig& config, const TensorSpec& spec, uint64_t seed);

// A whole preset in memory (a benchmark preset needs ~12 GB of fp32).
absl::StatusOr<ModelWeights> MakePresetWeights(absl::string_view name, uint64_t seed = 0);

// A directory containing config.json -> LoadCheckpoint (seed ignored); else a preset name ->
// MakePresetWeights; else NOT_FOUND listing the presets.
absl::StatusOr<ModelWeights> LoadModel(const std::string& name_or_dir, uint64_t seed = 0);

// Writes a preset as a checkpoint directory (see WriteCheckpoint), generating one tensor at a time:
// peak memory is one fp32 tensor plus the shard plan, whatever the model size.
absl::Status WritePreset(absl::string_view name, uint64_t seed, const std::string& dir, DType dtype,
                         int64_t max_shard_bytes);

}  // namespace needle::engine
