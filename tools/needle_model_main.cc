// needle-model: inspects and materialises models. Lists the built-in presets, writes a preset as a
// Hugging Face style checkpoint directory (streaming, one tensor at a time), prints the parsed
// configuration of a directory or preset, and lists the tensors its architecture expects. A thin command-line
// shell over engine/presets.h and engine/checkpoint.h: no model logic lives here.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "engine/base/status_macros.h"
#include "engine/checkpoint.h"
#include "engine/model_config.h"
#include "engine/presets.h"
#include "engine/safetensors.h"
#include "nlohmann/json.hpp"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace needle::engine {
namespace {

constexpr char kUsage[] =
    "usage:\n"
    "  needle-model list\n"
    "  needle-model write --preset NAME --out DIR [--seed N] [--dtype bf16|fp16|fp32] [--shard-bytes N]\n"
    "  needle-model info --model DIR_OR_PRESET\n"
    "  needle-model tensors --model DIR_OR_PRESET\n"
    "options:\n"
    "  --shard-bytes N  largest shard in bytes, suffixes K, M, G (powers of 1000); 0 = one file (default)\n"
    "  --verbose        debug logging\n";

// "--name value" or "--name=value"; every option takes a value except --verbose.
absl::StatusOr<std::map<std::string, std::string>> ParseOptions(int argc, char** argv, int first) {
  std::map<std::string, std::string> opts;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument \"", arg, "\""));
    }
    arg = arg.substr(2);
    std::string value;
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else if (arg == "verbose") {
      value = "1";
    } else {
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat("--", arg, " needs a value"));
      value = argv[++i];
    }
    if (!opts.emplace(arg, value).second)
      return absl::InvalidArgumentError(absl::StrCat("--", arg, " given twice"));
  }
  return opts;
}

absl::Status OnlyKnown(const std::map<std::string, std::string>& opts,
                       std::initializer_list<absl::string_view> known) {
  for (const auto& [name, value] : opts) {
    bool ok = name == "verbose";
    for (absl::string_view k : known) ok = ok || name == k;
    if (!ok) return absl::InvalidArgumentError(absl::StrCat("unknown option --", name));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Required(const std::map<std::string, std::string>& opts,
                                     const std::string& name) {
  auto it = opts.find(name);
  if (it == opts.end() || it->second.empty())
    return absl::InvalidArgumentError(absl::StrCat("--", name, " is required"));
  return it->second;
}

absl::StatusOr<int64_t> ParseBytes(absl::string_view text) {
  int64_t scale = 1;
  if (!text.empty()) {
    switch (text.back()) {
      case 'K':
      case 'k':
        scale = 1000;
        break;
      case 'M':
      case 'm':
        scale = 1000 * 1000;
        break;
      case 'G':
      case 'g':
        scale = 1000 * 1000 * 1000;
        break;
      default:
        break;
    }
    if (scale != 1) text.remove_suffix(1);
  }
  int64_t v = 0;
  if (!absl::SimpleAtoi(text, &v) || v < 0 || v > INT64_MAX / scale) {
    return absl::InvalidArgumentError(absl::StrCat("--shard-bytes: \"", text, "\" is not a byte count"));
  }
  return v * scale;
}

std::string HumanCount(int64_t n) {
  if (n >= 1'000'000'000) return absl::StrFormat("%.2fB", n / 1e9);
  if (n >= 1'000'000) return absl::StrFormat("%.2fM", n / 1e6);
  if (n >= 1'000) return absl::StrFormat("%.1fK", n / 1e3);
  return absl::StrCat(n);
}

absl::Status List() {
  std::printf("%-18s %-10s %14s %9s  %s\n", "name", "arch", "parameters", "", "description");
  for (const std::string& name : PresetNames()) {
    NEEDLE_ASSIGN_OR_RETURN(ModelConfig c, PresetConfig(name));
    NEEDLE_ASSIGN_OR_RETURN(std::string description, PresetDescription(name));
    const int64_t params = ParameterCount(c);
    std::printf("%-18s %-10s %14lld %9s  %s\n", name.c_str(), std::string(ArchitectureName(c.arch)).c_str(),
                static_cast<long long>(params), HumanCount(params).c_str(), description.c_str());
  }
  return absl::OkStatus();
}

absl::Status Write(const std::map<std::string, std::string>& opts) {
  NEEDLE_RETURN_IF_ERROR(OnlyKnown(opts, {"preset", "out", "seed", "dtype", "shard-bytes"}));
  NEEDLE_ASSIGN_OR_RETURN(std::string preset, Required(opts, "preset"));
  NEEDLE_ASSIGN_OR_RETURN(std::string out, Required(opts, "out"));
  uint64_t seed = 0;
  if (auto it = opts.find("seed"); it != opts.end() && !absl::SimpleAtoi(it->second, &seed)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--seed: \"", it->second, "\" is not a non-negative integer"));
  }
  DType dtype = DType::kBF16;
  if (auto it = opts.find("dtype"); it != opts.end()) {
    NEEDLE_ASSIGN_OR_RETURN(dtype, ParseStorageDType(it->second));
  }
  int64_t shard_bytes = 0;
  if (auto it = opts.find("shard-bytes"); it != opts.end()) {
    NEEDLE_ASSIGN_OR_RETURN(shard_bytes, ParseBytes(it->second));
  }
  NEEDLE_ASSIGN_OR_RETURN(ModelConfig config, PresetConfig(preset));

  const auto start = std::chrono::steady_clock::now();
  NEEDLE_RETURN_IF_ERROR(WritePreset(preset, seed, out, dtype, shard_bytes));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const int64_t params = ParameterCount(config);
  std::printf("wrote preset %s (seed %llu, %lld parameters, %s, %lld bytes of tensors) to %s in %.1f s\n",
              preset.c_str(), static_cast<unsigned long long>(seed), static_cast<long long>(params),
              std::string(DTypeName(dtype)).c_str(), static_cast<long long>(params * DTypeSize(dtype)),
              out.c_str(), seconds);
  return absl::OkStatus();
}

// A directory with config.json, else a preset name. `source` says which.
absl::StatusOr<ModelConfig> ResolveConfig(const std::string& model, std::string* source) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_regular_file(fs::path(model) / "config.json", ec)) {
    *source = (fs::path(model) / "config.json").string();
    return LoadModelConfig(*source);
  }
  absl::StatusOr<ModelConfig> preset = PresetConfig(model);
  if (!preset.ok()) {
    return absl::NotFoundError(absl::StrCat(
        "\"", model,
        "\" is neither a checkpoint directory (no config.json) nor a preset: ", preset.status().message()));
  }
  *source = absl::StrCat("preset ", model);
  return preset;
}

absl::Status Info(const std::map<std::string, std::string>& opts) {
  NEEDLE_RETURN_IF_ERROR(OnlyKnown(opts, {"model"}));
  NEEDLE_ASSIGN_OR_RETURN(std::string model, Required(opts, "model"));
  std::string source;
  NEEDLE_ASSIGN_OR_RETURN(ModelConfig c, ResolveConfig(model, &source));
  // config.json fields, plus what needle derives from them under a key parsers ignore.
  nlohmann::json j = ModelConfigToJson(c);
  nlohmann::json derived = {{"source", source},
                            {"architecture", std::string(ArchitectureName(c.arch))},
                            {"parameters", ParameterCount(c)},
                            {"head_dim_qk", c.head_dim_qk},
                            {"head_dim_v", c.head_dim_v}};
  if (c.IsNsa()) {
    derived["nsa"] = {
        {"cmp_block", c.nsa.cmp_block},
        {"cmp_stride", c.nsa.cmp_stride},
        {"sel_block", c.nsa.sel_block},
        {"num_selected", c.nsa.num_selected},
        {"forced_initial", c.nsa.forced_initial},
        {"forced_local", c.nsa.forced_local},
        {"window", c.nsa.window},
        {"compression", c.nsa.compression == Compression::kMlpPreRope ? "mlp-pre-rope" : "mean-post-rope"},
        {"shared_kv", c.nsa.shared_kv},
        {"cmp_mlp_hidden", c.nsa.cmp_mlp_hidden},
        {"topk_merge_chunk", c.nsa.topk_merge_chunk}};
  }
  j["needle"] = derived;
  std::printf("%s\n", j.dump(2).c_str());
  return absl::OkStatus();
}

// The tensors the architecture expects (TensorSpecs order); for a directory also each one's stored
// dtype and file, "MISSING" where absent.
absl::Status Tensors(const std::map<std::string, std::string>& opts) {
  NEEDLE_RETURN_IF_ERROR(OnlyKnown(opts, {"model"}));
  NEEDLE_ASSIGN_OR_RETURN(std::string model, Required(opts, "model"));
  std::string source;
  NEEDLE_ASSIGN_OR_RETURN(ModelConfig c, ResolveConfig(model, &source));
  const bool is_dir = !absl::StartsWith(source, "preset ");
  absl::StatusOr<SafetensorsCheckpoint> ckpt = absl::NotFoundError("preset");
  if (is_dir) {
    ckpt = SafetensorsCheckpoint::Open(model);
    if (!ckpt.ok()) return ckpt.status();
  }
  for (const TensorSpec& spec : TensorSpecs(c)) {
    std::string line = absl::StrFormat("%-56s [%s]", spec.name, absl::StrJoin(spec.shape, ", "));
    if (is_dir) {
      const SafetensorsCheckpoint::Entry e = ckpt->Find(spec.name);
      if (e.info == nullptr) {
        absl::StrAppend(&line, "  MISSING");
      } else {
        absl::StrAppend(&line, "  ", DTypeName(e.info->dtype), " [", absl::StrJoin(e.info->shape, ", "), "] ",
                        std::filesystem::path(e.file->path()).filename().string());
      }
    }
    std::printf("%s\n", line.c_str());
  }
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  if (argc < 2 || absl::string_view(argv[1]) == "--help" || absl::string_view(argv[1]) == "-h" ||
      absl::string_view(argv[1]) == "help") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  absl::StatusOr<std::map<std::string, std::string>> opts = ParseOptions(argc, argv, 2);
  if (!opts.ok()) {
    std::fprintf(stderr, "needle-model %s: %s\n%s", command.c_str(),
                 std::string(opts.status().message()).c_str(), kUsage);
    return 2;
  }
  auto log = spdlog::stderr_color_mt("engine");
  log->set_level(opts->count("verbose") ? spdlog::level::debug : spdlog::level::info);

  absl::Status status;
  if (command == "list") {
    status = OnlyKnown(*opts, {});
    if (status.ok()) status = List();
  } else if (command == "write") {
    status = Write(*opts);
  } else if (command == "info") {
    status = Info(*opts);
  } else if (command == "tensors") {
    status = Tensors(*opts);
  } else {
    std::fprintf(stderr, "needle-model: unknown command \"%s\"\n%s", command.c_str(), kUsage);
    return 2;
  }
  if (!status.ok()) {
    std::fprintf(stderr, "needle-model %s: %s\n", command.c_str(), status.ToString().c_str());
    return absl::IsInvalidArgument(status) ? 2 : 1;
  }
  return 0;
}

}  // namespace
}  // namespace needle::engine

int main(int argc, char** argv) { return needle::engine::Main(argc, argv); }
