// The preset table and the deterministic weight generator. Configurations are written as config.json
// objects and parsed by ModelConfigFromJson, so a preset and the checkpoint written from it parse to
// the same ModelConfig by construction.
#include "engine/presets.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/base/status_macros.h"
#include "engine/bf16.h"
#include "engine/checkpoint.h"
#include "nlohmann/json.hpp"

namespace needle::engine {
namespace {

using json = nlohmann::json;

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;  // splitmix64's increment

struct Preset {
  const char* name;
  const char* description;
  json config;  // config.json fields
};

// Tiny models: a byte vocabulary (ids 0-255 are bytes, 256 = bos, 257 = eos, 258 = pad).
json Tiny(json fields) {
  json j = {{"vocab_size", 259},
            {"bos_token_id", 256},
            {"eos_token_id", 257},
            {"max_position_embeddings", 8192},
            {"rope_theta", 10000.0}};
  j.update(fields);
  return j;
}

// Benchmark models: a Llama-sized vocabulary, 128k positions.
json Bench(json fields) {
  json j = {{"vocab_size", 32000},    {"bos_token_id", 1},
            {"eos_token_id", 2},      {"max_position_embeddings", 131072},
            {"rope_theta", 10000.0},  {"hidden_size", 2560},
            {"num_hidden_layers", 30}};
  j.update(fields);
  return j;
}

const std::vector<Preset>& Presets() {
  static const std::vector<Preset>* presets = [] {
    const json tiny_nsa = {{"model_type", "nsa"}, {"hidden_size", 64}, {"num_hidden_layers", 2},
                           {"num_heads", 16},     {"num_kv_heads", 1}, {"block_size", 16},
                           {"block_counts", 4},   {"window_size", 32}, {"intermediate_size", 128}};
    const json tiny_llama = {{"model_type", "llama"},    {"hidden_size", 64},        {"num_hidden_layers", 2},
                             {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"head_dim", 16},
                             {"intermediate_size", 128}};
    // The paper's attention geometry: 64 query heads in 4 KV groups, d_k = 192, d_v = 128.
    const json paper_geometry = {{"num_attention_heads", 64},
                                 {"num_key_value_heads", 4},
                                 {"qk_head_dim", 192},
                                 {"v_head_dim", 128},
                                 {"intermediate_size", 3840}};
    const json fla_geometry = {{"num_heads", 64},          {"num_kv_heads", 4}, {"num_attention_heads", 64},
                               {"num_key_value_heads", 4}, {"head_dim", 64},    {"intermediate_size", 9216}};
    const json tiny_llama_nsa = {{"model_type", "llama-nsa"},
                                 {"hidden_size", 64},
                                 {"num_hidden_layers", 2},
                                 {"num_attention_heads", 4},
                                 {"num_key_value_heads", 2},
                                 {"head_dim", 16},
                                 {"block_size", 16},
                                 {"block_counts", 3},
                                 {"window_size", 32},
                                 {"intermediate_size", 128}};
    json tiny_nsa_qkvbias = tiny_nsa;
    tiny_nsa_qkvbias["qkv_bias"] = true;
    json tiny_llama_nsa_merge = tiny_llama_nsa;
    tiny_llama_nsa_merge["block_counts"] = 16;
    json tiny_llama_tied = tiny_llama;
    tiny_llama_tied["tie_word_embeddings"] = true;
    json paper_nsa = paper_geometry;
    paper_nsa.update(json{{"model_type", "nsa-paper"},
                          {"compress_block_size", 32},
                          {"compress_stride", 16},
                          {"select_block_size", 64},
                          {"select_block_count", 16},
                          {"forced_initial_blocks", 1},
                          {"forced_local_blocks", 2},
                          {"window_size", 512},
                          {"compress_mlp_hidden", 256}});
    json paper_dense = paper_geometry;
    paper_dense["model_type"] = "llama";
    json fla_nsa = fla_geometry;
    fla_nsa.update(
        json{{"model_type", "nsa"}, {"block_size", 64}, {"block_counts", 16}, {"window_size", 512}});
    json fla_dense = fla_geometry;
    fla_dense["model_type"] = "llama";

    return new std::vector<Preset>{
        {"demo", "nsa-paper at the paper's l/d/l'/n/w, small widths; the default model, runs on a CPU",
         Tiny({{"model_type", "nsa-paper"},
               {"hidden_size", 128},
               {"num_hidden_layers", 2},
               {"num_attention_heads", 8},
               {"num_key_value_heads", 2},
               {"head_dim", 32},
               {"intermediate_size", 256},
               {"compress_block_size", 32},
               {"compress_stride", 16},
               {"select_block_size", 64},
               {"select_block_count", 16},
               {"forced_initial_blocks", 1},
               {"forced_local_blocks", 2},
               {"window_size", 512},
               {"compress_mlp_hidden", 64},
               {"max_position_embeddings", 16384}})},
        {"tiny-nsa", "FLA nsa, head_dim 64, block 16, 4 blocks, window 32", Tiny(tiny_nsa)},
        {"tiny-llama-nsa", "llama-nsa (fla-org kernel), block 16, block_counts 3 (4 top-k slots), window 32",
         Tiny(tiny_llama_nsa)},
        {"tiny-nsa-paper", "nsa-paper with d_k != d_v, l=8 d=4 l'=16 n=4 w=32",
         Tiny({{"model_type", "nsa-paper"},
               {"hidden_size", 64},
               {"num_hidden_layers", 2},
               {"num_attention_heads", 4},
               {"num_key_value_heads", 2},
               {"qk_head_dim", 24},
               {"v_head_dim", 16},
               {"intermediate_size", 128},
               {"compress_block_size", 8},
               {"compress_stride", 4},
               {"select_block_size", 16},
               {"select_block_count", 4},
               {"forced_initial_blocks", 1},
               {"forced_local_blocks", 2},
               {"window_size", 32},
               {"compress_mlp_hidden", 16}})},
        {"tiny-llama", "dense llama baseline", Tiny(tiny_llama)},
        {"tiny-nsa-qkvbias", "tiny-nsa with q/k/v biases", Tiny(tiny_nsa_qkvbias)},
        {"tiny-llama-tied", "tiny-llama with tied embeddings (no lm_head tensor)", Tiny(tiny_llama_tied)},
        {"tiny-llama-nsa-merge",
         "tiny-llama-nsa with block_counts 16: 16 top-k slots > 16/2, so fla-org's chunked top-k merge applies",
         Tiny(tiny_llama_nsa_merge)},
        {"paper-nsa", "benchmark: nsa-paper, paper geometry (64 heads, 4 KV, d_k 192, d_v 128), ~3.0B",
         Bench(paper_nsa)},
        {"paper-dense", "benchmark: dense llama with paper-nsa's geometry and MLP", Bench(paper_dense)},
        {"fla-nsa", "benchmark: FLA nsa, 64 heads, 4 KV, head_dim 64, block 64, 16 blocks, window 512",
         Bench(fla_nsa)},
        {"fla-dense", "benchmark: dense llama with fla-nsa's geometry and MLP", Bench(fla_dense)},
    };
  }();
  return *presets;
}

const Preset* FindPreset(absl::string_view name) {
  for (const Preset& p : Presets()) {
    if (name == p.name) return &p;
  }
  return nullptr;
}

absl::Status UnknownPreset(absl::string_view name) {
  return absl::NotFoundError(
      absl::StrCat("unknown preset \"", name, "\" (presets: ", absl::StrJoin(PresetNames(), ", "), ")"));
}

uint64_t Fnv1a64(absl::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

// Fills out[i] = RoundToBf16(float(mean + std * z_{first + i})) for i in [0, n).
void FillNormal(uint64_t stream, InitRule rule, uint64_t first, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const double z = StandardNormalAt(stream, first + static_cast<uint64_t>(i));
    out[i] = RoundToBf16(static_cast<float>(rule.mean + rule.std * z));
  }
}

}  // namespace

std::vector<std::string> PresetNames() {
  std::vector<std::string> names;
  for (const Preset& p : Presets()) names.push_back(p.name);
  return names;
}

absl::StatusOr<std::string> PresetDescription(absl::string_view name) {
  const Preset* p = FindPreset(name);
  if (p == nullptr) return UnknownPreset(name);
  return std::string(p->description);
}

absl::StatusOr<ModelConfig> PresetConfig(absl::string_view name) {
  const Preset* p = FindPreset(name);
  if (p == nullptr) return UnknownPreset(name);
  return ModelConfigFromJson(p->config, absl::StrCat("preset ", name));
}

uint64_t SplitMix64Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t SplitMix64At(uint64_t state, uint64_t k) { return SplitMix64Mix(state + (k + 1) * kGolden); }

uint64_t TensorStream(uint64_t seed, absl::string_view name) {
  return SplitMix64Mix(SplitMix64Mix(seed) ^ Fnv1a64(name));
}

double StandardNormalAt(uint64_t stream, uint64_t i) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  constexpr double kInv2To53 = 1.0 / 9007199254740992.0;
  const uint64_t p = i / 2;
  const double u1 = (static_cast<double>(SplitMix64At(stream, 2 * p) >> 11) + 0.5) * kInv2To53;
  const double u2 = (static_cast<double>(SplitMix64At(stream, 2 * p + 1) >> 11) + 0.5) * kInv2To53;
  const double r = std::sqrt(-2.0 * std::log(u1));
  return (i % 2 == 0) ? r * std::cos(kTwoPi * u2) : r * std::sin(kTwoPi * u2);
}

InitRule InitRuleFor(const ModelConfig& config, const TensorSpec& spec) {
  const absl::string_view name = spec.name;
  if (name == "model.embeddings.weight" || name == "model.embed_tokens.weight") return {0.0, 1.0};
  if (absl::EndsWith(name, "norm.weight")) return {1.0, 0.1};
  if (absl::EndsWith(name, ".bias") || absl::EndsWith(name, ".pos_emb")) return {0.0, 0.1};
  if (spec.shape.size() == 2 && spec.shape[1] > 0) {
    // Linear [out, in]: unit-variance inputs give unit-variance outputs.
    double std = 1.0 / std::sqrt(static_cast<double>(spec.shape[1]));
    if (absl::EndsWith(name, "o_proj.weight") || absl::EndsWith(name, "down_proj.weight")) {
      std /= std::sqrt(2.0 * config.num_layers);
    }
    return {0.0, std};
  }
  return {0.0, 0.1};  // not reached for any current architecture (presets_test checks)
}

Tensor GenerateTensor(const ModelConfig& config, const TensorSpec& spec, uint64_t seed) {
  Tensor t;
  t.shape = spec.shape;
  int64_t n = 1;
  for (int64_t d : spec.shape) n *= d;
  t.data.resize(static_cast<size_t>(n));
  const uint64_t stream = TensorStream(seed, spec.name);
  const InitRule rule = InitRuleFor(config, spec);
  // Counter-based: the split across threads does not change any value.
  constexpr int64_t kPerThread = int64_t{1} << 20;
  const int64_t threads = std::min<int64_t>(
      {(n + kPerThread - 1) / kPerThread, std::max(1u, std::thread::hardware_concurrency()), 32});
  if (threads <= 1) {
    FillNormal(stream, rule, 0, n, t.data.data());
    return t;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t k = 0; k < threads; ++k) {
    const int64_t begin = k * chunk, end = std::min(n, begin + chunk);
    if (begin >= end) break;
    pool.emplace_back(FillNormal, stream, rule, static_cast<uint64_t>(begin), end - begin,
                      t.data.data() + begin);
  }
  for (std::thread& th : pool) th.join();
  return t;
}

absl::StatusOr<ModelWeights> MakePresetWeights(absl::string_view name, uint64_t seed) {
  NEEDLE_ASSIGN_OR_RETURN(ModelConfig config, PresetConfig(name));
  ModelWeights w;
  w.config = config;
  w.layers.resize(static_cast<size_t>(config.num_layers));
  for (const TensorSpec& spec : TensorSpecs(config)) spec.slot(w) = GenerateTensor(config, spec, seed);
  return w;
}

absl::StatusOr<ModelWeights> LoadModel(const std::string& name_or_dir, uint64_t seed) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!name_or_dir.empty() && fs::is_regular_file(fs::path(name_or_dir) / "config.json", ec)) {
    return LoadCheckpoint(name_or_dir);
  }
  if (FindPreset(name_or_dir) != nullptr) return MakePresetWeights(name_or_dir, seed);
  return absl::NotFoundError(absl::StrCat("\"", name_or_dir, "\" is neither a checkpoint directory (no ",
                                          (fs::path(name_or_dir) / "config.json").string(),
                                          ") nor a preset (presets: ", absl::StrJoin(PresetNames(), ", "),
                                          ")"));
}

absl::Status WritePreset(absl::string_view name, uint64_t seed, const std::string& dir, DType dtype,
                         int64_t max_shard_bytes) {
  NEEDLE_ASSIGN_OR_RETURN(ModelConfig config, PresetConfig(name));
  const std::vector<TensorSpec> specs = TensorSpecs(config);
  std::vector<TensorEntry> entries;
  for (const TensorSpec& spec : specs) entries.push_back({spec.name, spec.shape});
  NEEDLE_RETURN_IF_ERROR(
      WriteSafetensorsCheckpoint(dir, entries, dtype, max_shard_bytes,
                                 [&](size_t i, std::vector<float>& scratch) -> absl::StatusOr<const float*> {
                                   scratch = std::move(GenerateTensor(config, specs[i], seed).data);
                                   return scratch.data();
                                 }));
  return WriteConfigJson(dir, config);
}

}  // namespace needle::engine
