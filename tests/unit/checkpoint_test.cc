// Checkpoint directories: every tiny preset survives WriteCheckpoint -> LoadCheckpoint bit for bit
// (bf16, fp32, sharded; fp16 equals the independent fp16 rounding of each value), streaming
// WritePreset equals the in-memory preset, and missing, misshapen and mistyped tensors are refused
// with messages naming the tensor, the file or directory, and the expected and actual values.
#include "engine/checkpoint.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/bf16.h"
#include "engine/presets.h"
#include "nlohmann/json.hpp"

namespace needle::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "needle_ckpt_XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return (fs::path(path_) / name).string(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::vector<std::string> TinyPresets() {
  std::vector<std::string> names;
  for (const std::string& n : PresetNames()) {
    if (n == "demo" || absl::StartsWith(n, "tiny-")) names.push_back(n);
  }
  return names;
}

// Every tensor of `want` equals `got` after `round` (identity for bit-exact formats), bit for bit.
void ExpectSameWeights(const ModelWeights& want, const ModelWeights& got, const std::string& what,
                       float (*round)(float) = nullptr) {
  ASSERT_TRUE(want.config == got.config) << what;
  ModelWeights& w = const_cast<ModelWeights&>(want);
  ModelWeights& g = const_cast<ModelWeights&>(got);
  for (const TensorSpec& spec : TensorSpecs(want.config)) {
    const Tensor& a = spec.slot(w);
    const Tensor& b = spec.slot(g);
    ASSERT_EQ(a.shape, b.shape) << what << " " << spec.name;
    ASSERT_EQ(a.data.size(), b.data.size()) << what << " " << spec.name;
    for (size_t i = 0; i < a.data.size(); ++i) {
      const float expected = round ? round(a.data[i]) : a.data[i];
      ASSERT_EQ(FloatBits(b.data[i]), FloatBits(expected))
          << what << " " << spec.name << "[" << i << "]: wrote " << a.data[i] << ", read " << b.data[i];
    }
  }
  if (want.config.tie_word_embeddings) {
    EXPECT_TRUE(got.lm_head.empty()) << what;
  }
}

TEST(Checkpoint, EveryTinyPresetRoundTrips) {
  ASSERT_EQ(TinyPresets().size(), 8u);
  for (const std::string& name : TinyPresets()) {
    auto w = MakePresetWeights(name, /*seed=*/3);
    ASSERT_TRUE(w.ok()) << name << ": " << w.status();
    struct Variant {
      DType dtype;
      int64_t shard_bytes;
      float (*round)(float);
    };
    for (const Variant& v : {Variant{DType::kBF16, 0, nullptr}, Variant{DType::kF32, 0, nullptr},
                             Variant{DType::kBF16, 20000, nullptr}, Variant{DType::kF16, 0, &RoundToFp16}}) {
      const std::string what = absl::StrCat(name, " as ", DTypeName(v.dtype), " shards of ", v.shard_bytes);
      TempDir dir;
      ASSERT_TRUE(WriteCheckpoint(dir.path(), *w, v.dtype, v.shard_bytes).ok()) << what;
      EXPECT_EQ(fs::exists(dir / "model.safetensors.index.json"), v.shard_bytes > 0) << what;
      auto back = LoadCheckpoint(dir.path());
      ASSERT_TRUE(back.ok()) << what << ": " << back.status();
      ExpectSameWeights(*w, *back, what, v.round);
    }
  }
}

TEST(Checkpoint, WritePresetStreamsTheSameWeights) {
  TempDir dir;
  ASSERT_TRUE(WritePreset("tiny-nsa-paper", 5, dir.path(), DType::kBF16, 4096).ok());
  int shards = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) {
    if (absl::StartsWith(e.path().filename().string(), "model-")) ++shards;
  }
  EXPECT_GT(shards, 2);
  auto loaded = LoadCheckpoint(dir.path());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto made = MakePresetWeights("tiny-nsa-paper", 5);
  ASSERT_TRUE(made.ok());
  ExpectSameWeights(*made, *loaded, "WritePreset tiny-nsa-paper");

  auto via_load_model = LoadModel(dir.path(), /*seed=*/99);  // seed ignored for directories
  ASSERT_TRUE(via_load_model.ok()) << via_load_model.status();
  ExpectSameWeights(*made, *via_load_model, "LoadModel(dir)");
}

TEST(Checkpoint, LoadModelResolvesPresetsAndRefusesUnknownNames) {
  auto preset = LoadModel("tiny-llama", 4);
  ASSERT_TRUE(preset.ok()) << preset.status();
  auto made = MakePresetWeights("tiny-llama", 4);
  ASSERT_TRUE(made.ok());
  ExpectSameWeights(*made, *preset, "LoadModel(tiny-llama)");
  auto unknown = LoadModel("no-such-model");
  ASSERT_FALSE(unknown.ok());
  EXPECT_TRUE(absl::IsNotFound(unknown.status()));
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("no-such-model"));
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("demo, tiny-nsa"));
}

// tiny-llama's tensors as views, for hand-built broken checkpoints.
std::vector<NamedTensorView> Views(ModelWeights& w) {
  std::vector<NamedTensorView> views;
  for (const TensorSpec& spec : TensorSpecs(w.config)) {
    views.push_back({spec.name, spec.shape, spec.slot(w).data.data()});
  }
  return views;
}

TEST(CheckpointErrors, MissingTensor) {
  auto w = MakePresetWeights("tiny-llama");
  ASSERT_TRUE(w.ok());
  TempDir dir;
  std::vector<NamedTensorView> views = Views(*w);
  views.erase(
      std::remove_if(views.begin(), views.end(),
                     [](const NamedTensorView& v) { return v.name == "model.layers.1.mlp.up_proj.weight"; }),
      views.end());
  ASSERT_TRUE(WriteSafetensorsCheckpoint(dir.path(), views, DType::kBF16, 0).ok());
  ASSERT_TRUE(WriteConfigJson(dir.path(), w->config).ok());
  auto got = LoadCheckpoint(dir.path());
  ASSERT_FALSE(got.ok());
  EXPECT_TRUE(absl::IsNotFound(got.status())) << got.status();
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("\"model.layers.1.mlp.up_proj.weight\""));
  EXPECT_THAT(std::string(got.status().message()), HasSubstr(dir.path()));
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("[128, 64]"));
}

TEST(CheckpointErrors, WrongShape) {
  auto w = MakePresetWeights("tiny-llama");
  ASSERT_TRUE(w.ok());
  TempDir dir;
  std::vector<NamedTensorView> views = Views(*w);
  for (NamedTensorView& v : views) {
    if (v.name == "model.norm.weight") v.shape = {63};
  }
  ASSERT_TRUE(WriteSafetensorsCheckpoint(dir.path(), views, DType::kBF16, 0).ok());
  ASSERT_TRUE(WriteConfigJson(dir.path(), w->config).ok());
  auto got = LoadCheckpoint(dir.path());
  ASSERT_FALSE(got.ok());
  const std::string msg(got.status().message());
  EXPECT_THAT(msg, HasSubstr("\"model.norm.weight\""));
  EXPECT_THAT(msg, HasSubstr(dir / "model.safetensors"));
  EXPECT_THAT(msg, HasSubstr("shape [63], expected [64]"));
}

// A sharded checkpoint whose second shard is hand-written: `norm_header` describes model.norm.weight
// (and possibly more) over `data_bytes` bytes.
void WriteWithHandShard(const TempDir& dir, ModelWeights& w, const std::string& shard_header,
                        size_t data_bytes) {
  std::vector<NamedTensorView> views = Views(w);
  views.erase(std::remove_if(views.begin(), views.end(),
                             [](const NamedTensorView& v) { return v.name == "model.norm.weight"; }),
              views.end());
  ASSERT_TRUE(WriteSafetensorsFile(dir / "part1.safetensors", views, DType::kBF16).ok());
  {
    std::ofstream out(dir / "part2.safetensors", std::ios::binary);
    for (int b = 0; b < 8; ++b)
      out.put(static_cast<char>(static_cast<uint64_t>(shard_header.size()) >> (8 * b)));
    out << shard_header;
    for (size_t i = 0; i < data_bytes; i += 2) out << '\x80' << '\x3f';  // bf16 1.0, or garbage ints
  }
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  for (const NamedTensorView& v : views) index["weight_map"][v.name] = "part1.safetensors";
  index["weight_map"]["model.norm.weight"] = "part2.safetensors";
  std::ofstream(dir / "model.safetensors.index.json") << index.dump();
  ASSERT_TRUE(WriteConfigJson(dir.path(), w.config).ok());
}

TEST(CheckpointErrors, WrongDType) {
  auto w = MakePresetWeights("tiny-llama");
  ASSERT_TRUE(w.ok());
  TempDir dir;
  WriteWithHandShard(dir, *w, R"({"model.norm.weight":{"dtype":"I32","shape":[64],"data_offsets":[0,256]}})",
                     256);
  auto got = LoadCheckpoint(dir.path());
  ASSERT_FALSE(got.ok());
  const std::string msg(got.status().message());
  EXPECT_THAT(msg, HasSubstr("\"model.norm.weight\""));
  EXPECT_THAT(msg, HasSubstr(dir / "part2.safetensors"));
  EXPECT_THAT(msg, HasSubstr("dtype I32, expected BF16, F16 or F32"));
}

TEST(Checkpoint, IgnoresExtraTensorsOfAnyDType) {
  auto w = MakePresetWeights("tiny-llama");
  ASSERT_TRUE(w.ok());
  TempDir dir;
  // model.norm.weight as BF16 1.0 (128 bytes) plus an unused I64 buffer, as HF checkpoints sometimes hold.
  WriteWithHandShard(dir, *w,
                     R"({"model.norm.weight":{"dtype":"BF16","shape":[64],"data_offsets":[0,128]},)"
                     R"("model.rotary_emb.inv_freq":{"dtype":"I64","shape":[8],"data_offsets":[128,192]}})",
                     192);
  auto got = LoadCheckpoint(dir.path());
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->final_norm.data.size(), 64u);
  for (float v : got->final_norm.data) EXPECT_EQ(v, 1.0f);
  EXPECT_EQ(got->layers[1].down_proj.data, w->layers[1].down_proj.data);
}

TEST(CheckpointErrors, ConfigProblemsAndBadWeights) {
  TempDir dir;
  auto missing = LoadCheckpoint(dir.path());
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("config.json"));
  auto w = MakePresetWeights("tiny-llama");
  ASSERT_TRUE(w.ok());
  w->layers[0].q_proj.data.pop_back();
  absl::Status s = WriteCheckpoint(dir.path(), *w, DType::kBF16, 0);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("model.layers.0.self_attn.q_proj.weight"));
  EXPECT_FALSE(fs::exists(dir / "config.json"));
}

TEST(Checkpoint, ParameterCountIsTheSumOfSpecs) {
  // tiny-llama by hand: embed 259*64 = 16576; per layer 2*64 (norms) + 64*64 (q) + 32*64 (k) +
  // 32*64 (v) + 64*64 (o) + 3*128*64 (mlp) = 36992; final norm 64; lm_head 16576.
  auto c = PresetConfig("tiny-llama");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(ParameterCount(*c), 16576 + 2 * 36992 + 64 + 16576);
}

}  // namespace
}  // namespace needle::engine
