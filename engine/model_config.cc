// Parsing and validation of config.json for the four architectures. The defaults below are those of
// each architecture's own code; docs/conventions.md lists them with their sources.
#include "engine/model_config.h"

#include <cmath>
#include <fstream>
#include <initializer_list>
#include <optional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"

namespace needle::engine {
namespace {

using json = nlohmann::json;

// A config value as an error message shows it: scalars as JSON (long ones cut short), arrays and
// objects by size only. A hostile config.json can then neither flood the log nor make the message
// recurse through deeply nested values (json::dump recurses once per level).
std::string Shown(const json& v) {
  if (v.is_array()) return absl::StrCat("an array of ", v.size(), " elements");
  if (v.is_object()) return absl::StrCat("an object of ", v.size(), " keys");
  std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 64) text = absl::StrCat(text.substr(0, 60), "...");
  return text;
}

absl::Status FieldError(absl::string_view source, absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": field \"", field, "\" ", what));
}

// Reads an integer field; `fallback` when absent or null (nullopt: the field is required).
absl::StatusOr<int> GetInt(const json& j, absl::string_view source, const char* field,
                           std::optional<int> fallback) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return FieldError(source, field, "is missing");
  }
  if (!it->is_number_integer() && !(it->is_number_float() && std::floor(it->get<double>()) ==
                                                                  it->get<double>())) {
    return FieldError(source, field, absl::StrCat("must be an integer, got ", Shown(*it)));
  }
  double v = it->get<double>();
  if (v < -2147483648.0 || v > 2147483647.0) return FieldError(source, field, "is out of range");
  return static_cast<int>(v);
}

absl::StatusOr<double> GetNumber(const json& j, absl::string_view source, const char* field,
                                 std::optional<double> fallback) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return FieldError(source, field, "is missing");
  }
  if (!it->is_number()) return FieldError(source, field, absl::StrCat("must be a number, got ", Shown(*it)));
  double v = it->get<double>();
  if (!std::isfinite(v)) return FieldError(source, field, "must be finite");
  return v;
}

absl::StatusOr<bool> GetBool(const json& j, absl::string_view source, const char* field, bool fallback) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return FieldError(source, field, absl::StrCat("must be a boolean, got ", Shown(*it)));
  return it->get<bool>();
}

// eos_token_id may be a list in HF configs; the first entry is the model's EOS.
absl::StatusOr<int> GetTokenId(const json& j, absl::string_view source, const char* field, int fallback) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return fallback;
  if (it->is_array()) {
    if (it->empty()) return fallback;
    json first = {{field, (*it)[0]}};
    return GetInt(first, source, field, fallback);
  }
  return GetInt(j, source, field, fallback);
}

// eos_token_id may be a single id or a list (generation stops on any of them).
absl::StatusOr<std::vector<int>> GetTokenIds(const json& j, absl::string_view source, const char* field,
                                             int fallback) {
  std::vector<int> ids;
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) {
    if (fallback >= 0) ids.push_back(fallback);
    return ids;
  }
  if (!it->is_array()) {
    NEEDLE_ASSIGN_OR_RETURN(int id, GetInt(j, source, field, fallback));
    ids.push_back(id);
    return ids;
  }
  for (const json& e : *it) {
    json one = {{field, e}};
    NEEDLE_ASSIGN_OR_RETURN(int id, GetInt(one, source, field, std::nullopt));
    ids.push_back(id);
  }
  return ids;
}

// RoPE theta: top-level rope_theta, or rope_parameters.rope_theta (newer transformers). Only plain
// RoPE is supported.
absl::StatusOr<double> GetRopeTheta(const json& j, absl::string_view src) {
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    return FieldError(src, "rope_scaling", "is not supported (only plain RoPE)");
  }
  if (auto it = j.find("rope_parameters"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) return FieldError(src, "rope_parameters", "must be an object");
    if (auto t = it->find("rope_type"); t != it->end() && !(t->is_string() && *t == "default")) {
      return FieldError(src, "rope_parameters.rope_type", absl::StrCat("must be \"default\", got ", Shown(*t)));
    }
    if (it->contains("rope_theta")) return GetNumber(*it, src, "rope_theta", std::nullopt);
  }
  auto it = j.find("rope_theta");
  if (it != j.end() && it->is_null()) return FieldError(src, "rope_theta", "must not be null");
  return GetNumber(j, src, "rope_theta", 10000.0);
}

// Fields whose null value the training code cannot run with.
absl::Status RejectNulls(const json& j, absl::string_view src, std::initializer_list<const char*> fields) {
  for (const char* f : fields) {
    if (auto it = j.find(f); it != j.end() && it->is_null()) return FieldError(src, f, "must not be null");
  }
  return absl::OkStatus();
}

// The top-k slots of `block_counts` (the kernels fill next_power_of_2(block_counts)); an error
// naming the field when that is not a positive int (a larger count would overflow the doubling).
absl::StatusOr<int> SelectedSlots(absl::string_view src, int block_counts) {
  if (block_counts < 1) return FieldError(src, "block_counts", "must be >= 1");
  if (block_counts > (1 << 30)) return FieldError(src, "block_counts", "must be at most 2^30");
  int p = 1;
  while (p < block_counts) p <<= 1;
  return p;
}

// FLA GatedMLP: intermediate = 256 * ceil(int(hidden * ratio * 2 / 3) / 256) when not given; 0 (which
// Validate() refuses) when that is not a positive int.
int FlaIntermediateSize(int hidden, double ratio) {
  const double raw = hidden * ratio * 2.0 / 3.0;
  if (!(raw >= 0 && raw <= 2147483647.0 - 255)) return 0;
  const int64_t r = static_cast<int64_t>(raw);
  return static_cast<int>(256 * ((r + 255) / 256));
}

absl::Status ParseNsa(const json& j, absl::string_view src, ModelConfig& c) {
  NEEDLE_ASSIGN_OR_RETURN(c.vocab_size, GetInt(j, src, "vocab_size", 32000));
  NEEDLE_ASSIGN_OR_RETURN(c.hidden_size, GetInt(j, src, "hidden_size", 2048));
  NEEDLE_ASSIGN_OR_RETURN(c.num_layers, GetInt(j, src, "num_hidden_layers", 24));
  NEEDLE_ASSIGN_OR_RETURN(c.num_heads, GetInt(j, src, "num_heads", 64));
  // FLA's layer uses num_heads when num_kv_heads is null; absent means the config default 4.
  if (auto it = j.find("num_kv_heads"); it != j.end() && it->is_null()) {
    c.num_kv_heads = c.num_heads;
  } else {
    NEEDLE_ASSIGN_OR_RETURN(c.num_kv_heads, GetInt(j, src, "num_kv_heads", 4));
  }
  NEEDLE_RETURN_IF_ERROR(RejectNulls(j, src, {"window_size", "block_counts", "block_size"}));
  // NSABlock does not pass config.head_dim to NativeSparseAttention, whose default is 64: the
  // attention runs at head_dim 64 whatever config.json says (docs/conventions.md).
  c.head_dim_qk = c.head_dim_v = 64;
  NEEDLE_ASSIGN_OR_RETURN(c.qkv_bias, GetBool(j, src, "qkv_bias", false));
  NEEDLE_ASSIGN_OR_RETURN(int block_size, GetInt(j, src, "block_size", 64));
  NEEDLE_ASSIGN_OR_RETURN(int block_counts, GetInt(j, src, "block_counts", 16));
  NEEDLE_ASSIGN_OR_RETURN(int window, GetInt(j, src, "window_size", 512));
  NEEDLE_ASSIGN_OR_RETURN(c.rope_theta, GetRopeTheta(j, src));
  NEEDLE_ASSIGN_OR_RETURN(c.max_position_embeddings, GetInt(j, src, "max_position_embeddings", 2048));
  NEEDLE_ASSIGN_OR_RETURN(double hidden_ratio, GetNumber(j, src, "hidden_ratio", 4.0));
  NEEDLE_ASSIGN_OR_RETURN(c.intermediate_size,
                          GetInt(j, src, "intermediate_size", FlaIntermediateSize(c.hidden_size, hidden_ratio)));
  NEEDLE_ASSIGN_OR_RETURN(double eps, GetNumber(j, src, "norm_eps", 1e-6));
  c.norm_eps = static_cast<float>(eps);
  NEEDLE_ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBool(j, src, "tie_word_embeddings", false));
  NEEDLE_ASSIGN_OR_RETURN(c.bos_token_id, GetTokenId(j, src, "bos_token_id", 1));
  NEEDLE_ASSIGN_OR_RETURN(c.eos_token_ids, GetTokenIds(j, src, "eos_token_id", 2));
  c.eos_token_id = c.eos_token_ids.empty() ? -1 : c.eos_token_ids[0];
  if (auto act = j.find("hidden_act"); act != j.end() && act->is_string() &&
                                       *act != "swish" && *act != "silu") {
    return FieldError(src, "hidden_act", absl::StrCat("must be \"swish\" or \"silu\", got ", Shown(*act)));
  }
  NsaParams& n = c.nsa;
  n.cmp_block = n.cmp_stride = n.sel_block = block_size;
  // The Triton top-k that models are trained with fills next_power_of_2(block_counts) slots.
  NEEDLE_ASSIGN_OR_RETURN(n.num_selected, SelectedSlots(src, block_counts));
  // Current FLA forces block 0, the previous and the current block. Checkpoints trained with older
  // FLA (current block only) say so with needle's optional keys (docs/conventions.md, 7.2).
  NEEDLE_ASSIGN_OR_RETURN(n.forced_initial, GetInt(j, src, "forced_initial_blocks", 1));
  NEEDLE_ASSIGN_OR_RETURN(n.forced_local, GetInt(j, src, "forced_local_blocks", 2));
  NEEDLE_ASSIGN_OR_RETURN(n.topk_merge_chunk, GetInt(j, src, "topk_merge_chunk", 0));
  n.window = window;
  n.compression = Compression::kMeanPostRope;
  n.shared_kv = true;
  n.cmp_mlp_hidden = 0;
  return absl::OkStatus();
}

absl::Status ParseLlamaCommon(const json& j, absl::string_view src, ModelConfig& c) {
  NEEDLE_ASSIGN_OR_RETURN(c.vocab_size, GetInt(j, src, "vocab_size", std::nullopt));
  NEEDLE_ASSIGN_OR_RETURN(c.hidden_size, GetInt(j, src, "hidden_size", std::nullopt));
  NEEDLE_ASSIGN_OR_RETURN(c.num_layers, GetInt(j, src, "num_hidden_layers", std::nullopt));
  NEEDLE_ASSIGN_OR_RETURN(c.num_heads, GetInt(j, src, "num_attention_heads", std::nullopt));
  NEEDLE_ASSIGN_OR_RETURN(c.num_kv_heads, GetInt(j, src, "num_key_value_heads", c.num_heads));
  if (c.num_heads <= 0) return FieldError(src, "num_attention_heads", "must be positive");
  NEEDLE_ASSIGN_OR_RETURN(c.head_dim_qk, GetInt(j, src, "head_dim", c.hidden_size / c.num_heads));
  // needle extension (nsa-paper, and the dense baseline of the same geometry): d_k != d_v.
  NEEDLE_ASSIGN_OR_RETURN(c.head_dim_qk, GetInt(j, src, "qk_head_dim", c.head_dim_qk));
  NEEDLE_ASSIGN_OR_RETURN(c.head_dim_v, GetInt(j, src, "v_head_dim", c.head_dim_qk));
  NEEDLE_ASSIGN_OR_RETURN(c.intermediate_size, GetInt(j, src, "intermediate_size", std::nullopt));
  NEEDLE_ASSIGN_OR_RETURN(double eps, GetNumber(j, src, "rms_norm_eps", 1e-6));
  c.norm_eps = static_cast<float>(eps);
  NEEDLE_ASSIGN_OR_RETURN(c.rope_theta, GetRopeTheta(j, src));
  NEEDLE_ASSIGN_OR_RETURN(c.max_position_embeddings, GetInt(j, src, "max_position_embeddings", 2048));
  NEEDLE_ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBool(j, src, "tie_word_embeddings", false));
  NEEDLE_ASSIGN_OR_RETURN(c.bos_token_id, GetTokenId(j, src, "bos_token_id", 1));
  NEEDLE_ASSIGN_OR_RETURN(c.eos_token_ids, GetTokenIds(j, src, "eos_token_id", 2));
  c.eos_token_id = c.eos_token_ids.empty() ? -1 : c.eos_token_ids[0];
  NEEDLE_ASSIGN_OR_RETURN(bool attention_bias, GetBool(j, src, "attention_bias", false));
  if (attention_bias) return FieldError(src, "attention_bias", "true is not supported");
  NEEDLE_ASSIGN_OR_RETURN(bool mlp_bias, GetBool(j, src, "mlp_bias", false));
  if (mlp_bias) return FieldError(src, "mlp_bias", "true is not supported");
  if (auto act = j.find("hidden_act"); act != j.end() && act->is_string() && *act != "silu" &&
                                       *act != "swish") {
    return FieldError(src, "hidden_act", absl::StrCat("must be \"silu\", got ", Shown(*act)));
  }
  c.qkv_bias = false;
  return absl::OkStatus();
}

absl::Status ParseLlamaNsa(const json& j, absl::string_view src, ModelConfig& c) {
  NEEDLE_RETURN_IF_ERROR(ParseLlamaCommon(j, src, c));
  if (auto it = j.find("inference_mode"); it != j.end()) {
    // SSA checkpoints reuse this model_type but drop the compressed (and window) branch.
    return FieldError(src, "inference_mode",
                      "marks an SSA checkpoint (selected branch only), which needle does not support");
  }
  NEEDLE_ASSIGN_OR_RETURN(int block_size, GetInt(j, src, "block_size", 64));
  NEEDLE_ASSIGN_OR_RETURN(int block_counts, GetInt(j, src, "block_counts", 16));
  NEEDLE_ASSIGN_OR_RETURN(int window, GetInt(j, src, "window_size", 512));
  NsaParams& n = c.nsa;
  n.cmp_block = n.cmp_stride = n.sel_block = block_size;
  // The fla-org native-sparse-attention top-k fills next_power_of_2(block_counts) slots, forces only
  // the query's own block and merges chunks of block_size blocks (docs/conventions.md, 7.2-7.3).
  NEEDLE_ASSIGN_OR_RETURN(n.num_selected, SelectedSlots(src, block_counts));
  if (n.num_selected > block_size) {
    return FieldError(src, "block_counts", absl::StrCat("rounds up to ", n.num_selected,
                                                        " slots, more than block_size (", block_size, ")"));
  }
  n.topk_merge_chunk = block_size;
  n.forced_initial = 0;
  n.forced_local = 1;
  n.window = window;
  n.compression = Compression::kMeanPostRope;
  n.shared_kv = true;
  n.cmp_mlp_hidden = 0;
  return absl::OkStatus();
}

absl::Status ParseNsaPaper(const json& j, absl::string_view src, ModelConfig& c) {
  NEEDLE_RETURN_IF_ERROR(ParseLlamaCommon(j, src, c));
  NsaParams& n = c.nsa;
  NEEDLE_ASSIGN_OR_RETURN(n.cmp_block, GetInt(j, src, "compress_block_size", 32));
  NEEDLE_ASSIGN_OR_RETURN(n.cmp_stride, GetInt(j, src, "compress_stride", 16));
  NEEDLE_ASSIGN_OR_RETURN(n.sel_block, GetInt(j, src, "select_block_size", 64));
  NEEDLE_ASSIGN_OR_RETURN(n.num_selected, GetInt(j, src, "select_block_count", 16));
  NEEDLE_ASSIGN_OR_RETURN(n.forced_initial, GetInt(j, src, "forced_initial_blocks", 1));
  NEEDLE_ASSIGN_OR_RETURN(n.forced_local, GetInt(j, src, "forced_local_blocks", 2));
  NEEDLE_ASSIGN_OR_RETURN(n.window, GetInt(j, src, "window_size", 512));
  NEEDLE_ASSIGN_OR_RETURN(n.cmp_mlp_hidden, GetInt(j, src, "compress_mlp_hidden", std::nullopt));
  n.compression = Compression::kMlpPreRope;
  n.shared_kv = false;
  return absl::OkStatus();
}

}  // namespace

absl::string_view ArchitectureName(Architecture arch) {
  switch (arch) {
    case Architecture::kNsa: return "nsa";
    case Architecture::kLlamaNsa: return "llama-nsa";
    case Architecture::kNsaPaper: return "nsa-paper";
    case Architecture::kLlama: return "llama";
  }
  return "unknown";
}

absl::StatusOr<Architecture> ParseArchitecture(absl::string_view model_type) {
  for (Architecture a : {Architecture::kNsa, Architecture::kLlamaNsa, Architecture::kNsaPaper,
                         Architecture::kLlama}) {
    if (ArchitectureName(a) == model_type) return a;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unsupported model_type \"", model_type, "\" (supported: nsa, llama-nsa, nsa-paper, llama)"));
}

absl::Status NsaParams::Validate() const {
  auto bad = [](absl::string_view what) { return absl::InvalidArgumentError(absl::StrCat("NSA: ", what)); };
  if (cmp_block < 1 || cmp_stride < 1 || sel_block < 1) return bad("block sizes must be positive");
  if (cmp_stride > cmp_block) return bad("compression stride d must not exceed block length l");
  if (sel_block % cmp_stride != 0) return bad("selection block l' must be a multiple of the stride d");
  if (num_selected < 1) return bad("num_selected must be >= 1");
  if (forced_initial < 0 || forced_local < 0) return bad("forced block counts must be >= 0");
  if (int64_t{forced_initial} + forced_local > num_selected) return bad("forced blocks exceed num_selected");
  if (window < 0) return bad("window must be >= 0");
  if (compression == Compression::kMlpPreRope && cmp_mlp_hidden < 1) return bad("compress_mlp_hidden must be >= 1");
  if (topk_merge_chunk < 0) return bad("topk_merge_chunk must be >= 0");
  if (compression == Compression::kMeanPostRope && !(cmp_block == cmp_stride)) {
    return bad("mean compression requires l = d");
  }
  return absl::OkStatus();
}

absl::Status ModelConfig::Validate() const {
  auto bad = [](absl::string_view what) { return absl::InvalidArgumentError(std::string(what)); };
  if (vocab_size < 1) return bad("vocab_size must be positive");
  if (hidden_size < 1) return bad("hidden_size must be positive");
  if (num_layers < 1) return bad("num_hidden_layers must be positive");
  if (num_heads < 1 || num_kv_heads < 1) return bad("head counts must be positive");
  if (num_heads % num_kv_heads != 0) {
    return bad(absl::StrCat("num_heads (", num_heads, ") must be a multiple of num_kv_heads (", num_kv_heads, ")"));
  }
  if (head_dim_qk < 2 || head_dim_qk % 2 != 0) return bad("head_dim must be even and >= 2 (RoPE pairs)");
  if (head_dim_v < 1) return bad("v head_dim must be positive");
  if (intermediate_size < 1) return bad("intermediate_size must be positive");
  if (!(norm_eps > 0) || !std::isfinite(norm_eps)) return bad("norm eps must be positive");
  if (!(rope_theta > 0)) return bad("rope_theta must be positive");
  if (max_position_embeddings < 1) return bad("max_position_embeddings must be positive");
  if (bos_token_id >= vocab_size) return bad("bos_token_id must be < vocab_size");
  for (int id : eos_token_ids) {
    if (id < 0 || id >= vocab_size) return bad(absl::StrCat("eos_token_id ", id, " must be in [0, vocab_size)"));
  }
  if (eos_token_id >= vocab_size) return bad("eos_token_id must be < vocab_size");
  if (IsNsa()) {
    if (nsa.shared_kv && head_dim_qk != head_dim_v) return bad("shared K/V requires equal head dims");
    return nsa.Validate();
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ModelConfigFromJson(const json& j, absl::string_view source) {
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  auto mt = j.find("model_type");
  if (mt == j.end() || !mt->is_string()) return FieldError(source, "model_type", "is missing or not a string");
  ModelConfig c;
  auto arch = ParseArchitecture(mt->get<std::string>());
  if (!arch.ok()) return absl::InvalidArgumentError(absl::StrCat(source, ": ", arch.status().message()));
  c.arch = *arch;
  switch (c.arch) {
    case Architecture::kNsa: NEEDLE_RETURN_IF_ERROR(ParseNsa(j, source, c)); break;
    case Architecture::kLlamaNsa: NEEDLE_RETURN_IF_ERROR(ParseLlamaNsa(j, source, c)); break;
    case Architecture::kNsaPaper: NEEDLE_RETURN_IF_ERROR(ParseNsaPaper(j, source, c)); break;
    case Architecture::kLlama: NEEDLE_RETURN_IF_ERROR(ParseLlamaCommon(j, source, c)); c.nsa = NsaParams{}; break;
  }
  if (absl::Status s = c.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", s.message()));
  }
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  return ModelConfigFromJson(j, path);
}

json ModelConfigToJson(const ModelConfig& c) {
  json j;
  j["model_type"] = std::string(ArchitectureName(c.arch));
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["intermediate_size"] = c.intermediate_size;
  j["rope_theta"] = c.rope_theta;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() != 1) {  // a list, or [] for a model without EOS (-1 would not load)
    j["eos_token_id"] = c.eos_token_ids;
  } else {
    j["eos_token_id"] = c.eos_token_id;
  }
  j["hidden_act"] = "silu";
  j["torch_dtype"] = "bfloat16";
  switch (c.arch) {
    case Architecture::kNsa:
      j["architectures"] = {"NSAForCausalLM"};
      j["hidden_act"] = "swish";
      j["num_heads"] = c.num_heads;
      j["num_kv_heads"] = c.num_kv_heads;
      j["head_dim"] = c.head_dim_qk;
      j["qkv_bias"] = c.qkv_bias;
      j["block_size"] = c.nsa.sel_block;
      j["block_counts"] = c.nsa.num_selected;
      j["window_size"] = c.nsa.window;
      j["norm_eps"] = c.norm_eps;
      if (c.nsa.forced_initial != 1 || c.nsa.forced_local != 2) {
        j["forced_initial_blocks"] = c.nsa.forced_initial;
        j["forced_local_blocks"] = c.nsa.forced_local;
      }
      if (c.nsa.topk_merge_chunk != 0) j["topk_merge_chunk"] = c.nsa.topk_merge_chunk;
      break;
    case Architecture::kLlama:
    case Architecture::kLlamaNsa:
    case Architecture::kNsaPaper:
      j["architectures"] = {c.arch == Architecture::kLlama ? "LlamaForCausalLM"
                            : c.arch == Architecture::kLlamaNsa ? "LlamaNSAForCausalLM"
                                                                : "NeedleNSAForCausalLM"};
      j["num_attention_heads"] = c.num_heads;
      j["num_key_value_heads"] = c.num_kv_heads;
      j["head_dim"] = c.head_dim_qk;
      j["rms_norm_eps"] = c.norm_eps;
      if (c.arch == Architecture::kLlamaNsa) {
        j["block_size"] = c.nsa.sel_block;
        j["block_counts"] = c.nsa.num_selected;
        j["window_size"] = c.nsa.window;
      }
      if (c.head_dim_v != c.head_dim_qk) {
        j["qk_head_dim"] = c.head_dim_qk;
        j["v_head_dim"] = c.head_dim_v;
      }
      if (c.arch == Architecture::kNsaPaper) {
        j["compress_block_size"] = c.nsa.cmp_block;
        j["compress_stride"] = c.nsa.cmp_stride;
        j["select_block_size"] = c.nsa.sel_block;
        j["select_block_count"] = c.nsa.num_selected;
        j["forced_initial_blocks"] = c.nsa.forced_initial;
        j["forced_local_blocks"] = c.nsa.forced_local;
        j["window_size"] = c.nsa.window;
        j["compress_mlp_hidden"] = c.nsa.cmp_mlp_hidden;
      }
      break;
  }
  return j;
}

bool operator==(const NsaParams& a, const NsaParams& b) {
  return a.cmp_block == b.cmp_block && a.cmp_stride == b.cmp_stride && a.sel_block == b.sel_block &&
         a.num_selected == b.num_selected && a.forced_initial == b.forced_initial &&
         a.forced_local == b.forced_local && a.window == b.window && a.compression == b.compression &&
         a.shared_kv == b.shared_kv && a.cmp_mlp_hidden == b.cmp_mlp_hidden &&
         a.topk_merge_chunk == b.topk_merge_chunk;
}

bool operator==(const ModelConfig& a, const ModelConfig& b) {
  return a.arch == b.arch && a.vocab_size == b.vocab_size && a.hidden_size == b.hidden_size &&
         a.num_layers == b.num_layers && a.num_heads == b.num_heads && a.num_kv_heads == b.num_kv_heads &&
         a.head_dim_qk == b.head_dim_qk && a.head_dim_v == b.head_dim_v &&
         a.intermediate_size == b.intermediate_size && a.norm_eps == b.norm_eps &&
         a.rope_theta == b.rope_theta && a.max_position_embeddings == b.max_position_embeddings &&
         a.qkv_bias == b.qkv_bias && a.tie_word_embeddings == b.tie_word_embeddings &&
         a.bos_token_id == b.bos_token_id && a.eos_token_ids == b.eos_token_ids &&
         (!a.IsNsa() || a.nsa == b.nsa);
}

}  // namespace needle::engine
