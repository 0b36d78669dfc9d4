// Checkpoint directories <-> ModelWeights. The tensor list comes from TensorSpecs; this file only
// matches names, checks shapes and dtypes, and moves data.
#include "engine/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/base/status_macros.h"
#include "spdlog/spdlog.h"

namespace needle::engine {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

int64_t ParameterCount(const ModelConfig& config) {
  int64_t total = 0;
  for (const TensorSpec& spec : TensorSpecs(config)) {
    int64_t n = 1;
    for (int64_t d : spec.shape) n *= d;
    total += n;
  }
  return total;
}

absl::StatusOr<ModelWeights> LoadCheckpoint(const std::string& dir) {
  namespace fs = std::filesystem;
  NEEDLE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig((fs::path(dir) / "config.json").string()));
  NEEDLE_ASSIGN_OR_RETURN(SafetensorsCheckpoint ckpt, SafetensorsCheckpoint::Open(dir));

  // Every architecture names layer i's tensors "model.layers.i.". A config.json that claims more
  // layers than the files hold fails here, before anything is sized by num_hidden_layers (an
  // absurd count would otherwise exhaust memory instead of naming the problem).
  const std::string last_layer = absl::StrCat("model.layers.", config.num_layers - 1, ".");
  const std::vector<std::string> stored = ckpt.TensorNames();  // sorted
  const auto at = std::lower_bound(stored.begin(), stored.end(), last_layer);
  if (at == stored.end() || !absl::StartsWith(*at, last_layer)) {
    return absl::NotFoundError(absl::StrCat(dir, ": the tensors of layer ", config.num_layers - 1, " (\"",
                                            last_layer, "*\") are missing: config.json says num_hidden_layers = ",
                                            config.num_layers));
  }

  ModelWeights w;
  w.config = config;
  w.layers.resize(static_cast<size_t>(config.num_layers));
  std::set<std::string> used;
  for (const TensorSpec& spec : TensorSpecs(config)) {
    const SafetensorsCheckpoint::Entry e = ckpt.Find(spec.name);
    if (e.info == nullptr) {
      return absl::NotFoundError(absl::StrCat(dir, ": tensor \"", spec.name, "\" (shape ",
                                              ShapeString(spec.shape), ") is missing from the checkpoint (",
                                              ArchitectureName(config.arch), " architecture)"));
    }
    if (e.info->shape != spec.shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(e.file->path(), ": tensor \"", spec.name, "\" has shape ", ShapeString(e.info->shape),
                       ", expected ", ShapeString(spec.shape), " from config.json"));
    }
    if (!IsFloatConvertible(e.info->dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(e.file->path(), ": tensor \"", spec.name,
                                                     "\" has dtype ", DTypeName(e.info->dtype),
                                                     ", expected BF16, F16 or F32"));
    }
    Tensor& t = spec.slot(w);
    t.shape = spec.shape;
    t.data.assign(static_cast<size_t>(e.info->numel()), 0.0f);
    NEEDLE_RETURN_IF_ERROR(e.file->ReadFloat32(*e.info, t.data.data()));
    used.insert(spec.name);
  }
  const std::vector<std::string>& names = stored;
  const size_t extra = names.size() - used.size();
  if (auto log = spdlog::get("engine")) {
    log->debug("{}: loaded {} tensors ({} parameters) from {} file(s); ignored {} unused tensor(s)", dir,
               used.size(), ParameterCount(config), ckpt.num_files(), extra);
    for (const std::string& name : names) {
      if (used.count(name) == 0) log->debug("{}: unused tensor \"{}\"", dir, name);
    }
  }
  return w;
}

absl::Status WriteConfigJson(const std::string& dir, const ModelConfig& config) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create directory: ", ec.message()));
  const std::string path = (fs::path(dir) / "config.json").string();
  const std::string tmp = path + ".tmp";
  const std::string text = ModelConfigToJson(config).dump(2) + "\n";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return absl::InternalError(absl::StrCat(tmp, ": cannot create"));
  const bool wrote = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  if (std::fclose(f) != 0 || !wrote) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(tmp, ": write failed"));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(path, ": cannot rename into place"));
  }
  return absl::OkStatus();
}

absl::Status WriteCheckpoint(const std::string& dir, const ModelWeights& w, DType dtype,
                             int64_t max_shard_bytes) {
  NEEDLE_RETURN_IF_ERROR(w.config.Validate());
  // TensorSpec slots take a mutable ModelWeights; they are only read here.
  ModelWeights& mw = const_cast<ModelWeights&>(w);
  if (mw.layers.size() != static_cast<size_t>(w.config.num_layers)) {
    return absl::InvalidArgumentError(
        absl::StrCat("WriteCheckpoint: ", mw.layers.size(), " layers, config says ", w.config.num_layers));
  }
  const std::vector<TensorSpec> specs = TensorSpecs(w.config);
  std::vector<TensorEntry> entries;
  std::vector<const float*> data;
  for (const TensorSpec& spec : specs) {
    const Tensor& t = spec.slot(mw);
    const int64_t n = TensorEntry{spec.name, spec.shape}.numel();
    if (t.shape != spec.shape || static_cast<int64_t>(t.data.size()) != n) {
      return absl::InvalidArgumentError(absl::StrCat("WriteCheckpoint: tensor \"", spec.name, "\" has shape ",
                                                     ShapeString(t.shape), " and ", t.data.size(),
                                                     " values, expected ", ShapeString(spec.shape)));
    }
    entries.push_back({spec.name, spec.shape});
    data.push_back(t.data.data());
  }
  NEEDLE_RETURN_IF_ERROR(WriteSafetensorsCheckpoint(
      dir, entries, dtype, max_shard_bytes,
      [&data](size_t i, std::vector<float>&) -> absl::StatusOr<const float*> { return data[i]; }));
  return WriteConfigJson(dir, w.config);
}

}  // namespace needle::engine
