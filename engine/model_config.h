// ModelConfig and NsaParams: what a checkpoint's config.json says about the network, validated once at
// load. Owns the parsing of the four supported architectures' config formats and the NSA index
// arithmetic (which compressed tokens and blocks a query sees); knows nothing of weights or caches.
#pragma once

#include <cstdint>
#include <string>
#include <vector>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace needle::engine {

enum class Architecture {
  kNsa,       // flash-linear-attention NSAForCausalLM, model_type "nsa"
  kLlamaNsa,  // Llama tensor names plus self_attn.g_proj, model_type "llama-nsa"
  kNsaPaper,  // needle's paper-faithful variant, model_type "nsa-paper" (docs/conventions.md)
  kLlama,     // dense full attention, model_type "llama": the baseline
};

absl::string_view ArchitectureName(Architecture arch);  // the model_type string
absl::StatusOr<Architecture> ParseArchitecture(absl::string_view model_type);

enum class Compression {
  kMeanPostRope,  // compressed K/V = mean of the block's post-RoPE K/V (nsa, llama-nsa)
  kMlpPreRope,    // MLP over pre-RoPE K/V plus an intra-block position embedding; the compressed key
                  // then gets RoPE at position i*d (nsa-paper)
};

// The NSA geometry of one model. Positions are 0-based; query t sees tokens 0..t.
struct NsaParams {
  int cmp_block = 32;      // l: raw tokens summarised by one compressed token
  int cmp_stride = 16;     // d: distance between the starts of consecutive compressed tokens
  int sel_block = 64;      // l': tokens per selection block
  int num_selected = 16;   // n: blocks selected per query and KV group, forced blocks included
  int forced_initial = 1;  // blocks 0..forced_initial-1 are always selected
  int forced_local = 2;    // the forced_local most recent blocks (current one first) are always selected
  int window = 512;        // w: window keys, the query included; 0 disables the window branch
  Compression compression = Compression::kMlpPreRope;
  bool shared_kv = false;  // one k_proj/v_proj feeds all three branches (else one per branch)
  int cmp_mlp_hidden = 0;  // kMlpPreRope: hidden width of the compression MLP
  // 0: exact top-n. C > 0: the chunked merge of the fla-org Triton top-k kernels, which scan blocks
  // in chunks of C and carry only the best C/2 forward; it differs from exact top-n when n > C/2
  // (docs/conventions.md section 7.3). llama-nsa checkpoints were trained with it (C = block_size).
  int topk_merge_chunk = 0;

  // N_c(t): compressed tokens visible to query t (0 if t + 1 < l).
  int64_t NumCompressed(int64_t t) const {
    return t + 1 < cmp_block ? 0 : (t + 1 - cmp_block) / cmp_stride + 1;
  }
  // Whether appending position t completes compressed token NumCompressed(t) - 1.
  bool CompletesCompressed(int64_t t) const {
    return t + 1 >= cmp_block && (t + 1 - cmp_block) % cmp_stride == 0;
  }
  // Selection blocks query t considers: 0..t/l' (the last one partial).
  int64_t NumSelectionBlocks(int64_t t) const { return t / sel_block + 1; }
  // l = d = l': compressed token j is selection block j (the FLA convention).
  bool IdentityScoreMap() const { return cmp_block == cmp_stride && cmp_stride == sel_block; }

  absl::Status Validate() const;
};

struct ModelConfig {
  Architecture arch = Architecture::kNsaPaper;
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;          // H: query heads
  int num_kv_heads = 0;       // H_kv: KV heads; G = H / H_kv query heads share one
  int head_dim_qk = 0;        // d_k
  int head_dim_v = 0;         // d_v (equal to d_k except in nsa-paper)
  int intermediate_size = 0;  // SwiGLU width
  float norm_eps = 1e-6f;     // RMSNorm epsilon
  double rope_theta = 10000.0;
  int max_position_embeddings = 0;  // the longest sequence (prompt + generation) served
  bool qkv_bias = false;            // q/k/v projections carry biases (g_proj, o_proj never do)
  bool tie_word_embeddings = false; // lm_head shares the embedding matrix
  int bos_token_id = -1;            // -1: none
  int eos_token_id = -1;            // -1: none; the first of eos_token_ids
  std::vector<int> eos_token_ids;   // every id that ends generation (config.json may list several)
  NsaParams nsa;                    // meaningless for kLlama

  bool IsNsa() const { return arch != Architecture::kLlama; }
  bool IsEos(int id) const {
    if (id == eos_token_id) return id >= 0;
    for (int e : eos_token_ids) {
      if (e == id) return true;
    }
    return false;
  }
  int GroupSize() const { return num_heads / num_kv_heads; }
  absl::Status Validate() const;
};

// Parses a Hugging Face style config.json object. Errors name the field (and `source`, usually the
// file path). Applies each architecture's defaults exactly as its training code does.
absl::StatusOr<ModelConfig> ModelConfigFromJson(const nlohmann::json& j,
                                                absl::string_view source = "config.json");
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& config_json_path);
// The inverse: a config.json in the architecture's own field names, which ModelConfigFromJson reads
// back to an equal ModelConfig.
nlohmann::json ModelConfigToJson(const ModelConfig& config);

bool operator==(const NsaParams& a, const NsaParams& b);
bool operator==(const ModelConfig& a, const ModelConfig& b);

}  // namespace needle::engine
