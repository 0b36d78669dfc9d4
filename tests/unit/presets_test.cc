// Presets: the table matches the documented geometries and parameter counts, the generator matches
// golden values computed independently (the published splitmix64 sequence; a separate Python
// implementation of the documented algorithm for the rest), generation is deterministic per seed,
// every value is bf16-exact, and the initialisation scales are the documented ones.
#include "engine/presets.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "engine/bf16.h"
#include "engine/checkpoint.h"

namespace needle::engine {
namespace {

using ::testing::HasSubstr;

const TensorSpec* FindSpec(const std::vector<TensorSpec>& specs, const std::string& name) {
  for (const TensorSpec& s : specs) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

TEST(Presets, NamesAndParameterCounts) {
  EXPECT_EQ(PresetNames(), (std::vector<std::string>{"demo", "tiny-nsa", "tiny-llama-nsa", "tiny-nsa-paper",
                                                     "tiny-llama", "tiny-nsa-qkvbias", "tiny-llama-tied",
                                                     "tiny-llama-nsa-merge", "paper-nsa", "paper-dense", "fla-nsa",
                                                     "fla-dense"}));
  // Counted by hand from the shapes (docs/models.md shows the sums).
  const std::vector<std::pair<std::string, int64_t>> counts = {
      {"demo", 773504},           {"tiny-nsa", 367296},      {"tiny-llama-nsa", 108736},
      {"tiny-nsa-paper", 147520}, {"tiny-llama", 107200},    {"tiny-nsa-qkvbias", 369600},
      {"tiny-llama-tied", 90624}, {"tiny-llama-nsa-merge", 108736},
      {"paper-nsa", 3012661760},  {"paper-dense", 2719900160},
      {"fla-nsa", 2970575360},    {"fla-dense", 2955829760}};
  for (const auto& [name, count] : counts) {
    auto c = PresetConfig(name);
    ASSERT_TRUE(c.ok()) << name << ": " << c.status();
    EXPECT_TRUE(c->Validate().ok()) << name;
    EXPECT_EQ(ParameterCount(*c), count) << name;
    EXPECT_TRUE(PresetDescription(name).ok());
  }
  auto bad = PresetConfig("tiny");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(absl::IsNotFound(bad.status()));
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("tiny-llama-tied"));
}

TEST(Presets, GeometriesAreTheDocumentedOnes) {
  auto demo = PresetConfig("demo");
  ASSERT_TRUE(demo.ok());
  EXPECT_EQ(demo->arch, Architecture::kNsaPaper);
  EXPECT_EQ(demo->vocab_size, 259);
  EXPECT_EQ(demo->bos_token_id, 256);
  EXPECT_EQ(demo->eos_token_id, 257);
  EXPECT_EQ(demo->hidden_size, 128);
  EXPECT_EQ(demo->num_layers, 2);
  EXPECT_EQ(demo->num_heads, 8);
  EXPECT_EQ(demo->num_kv_heads, 2);
  EXPECT_EQ(demo->head_dim_qk, 32);
  EXPECT_EQ(demo->head_dim_v, 32);
  EXPECT_EQ(demo->intermediate_size, 256);
  EXPECT_EQ(demo->max_position_embeddings, 16384);
  EXPECT_EQ(demo->nsa.cmp_block, 32);
  EXPECT_EQ(demo->nsa.cmp_stride, 16);
  EXPECT_EQ(demo->nsa.sel_block, 64);
  EXPECT_EQ(demo->nsa.num_selected, 16);
  EXPECT_EQ(demo->nsa.forced_initial, 1);
  EXPECT_EQ(demo->nsa.forced_local, 2);
  EXPECT_EQ(demo->nsa.window, 512);
  EXPECT_EQ(demo->nsa.cmp_mlp_hidden, 64);

  auto nsa = PresetConfig("tiny-nsa");
  ASSERT_TRUE(nsa.ok());
  EXPECT_EQ(nsa->arch, Architecture::kNsa);
  EXPECT_EQ(nsa->num_heads, 16);
  EXPECT_EQ(nsa->num_kv_heads, 1);
  EXPECT_EQ(nsa->head_dim_qk, 64);
  EXPECT_EQ(nsa->nsa.sel_block, 16);
  EXPECT_EQ(nsa->nsa.num_selected, 4);
  EXPECT_EQ(nsa->nsa.window, 32);
  EXPECT_EQ(nsa->max_position_embeddings, 8192);
  EXPECT_FALSE(nsa->qkv_bias);
  EXPECT_TRUE(PresetConfig("tiny-nsa-qkvbias")->qkv_bias);

  auto lnsa = PresetConfig("tiny-llama-nsa");
  ASSERT_TRUE(lnsa.ok());
  EXPECT_EQ(lnsa->arch, Architecture::kLlamaNsa);
  EXPECT_EQ(lnsa->head_dim_qk, 16);
  // block_counts 3 in config.json; the fla-org top-k fills next_power_of_2(3) = 4 slots.
  EXPECT_EQ(lnsa->nsa.num_selected, 4);
  EXPECT_EQ(lnsa->nsa.sel_block, 16);

  auto paper = PresetConfig("tiny-nsa-paper");
  ASSERT_TRUE(paper.ok());
  EXPECT_EQ(paper->head_dim_qk, 24);
  EXPECT_EQ(paper->head_dim_v, 16);
  EXPECT_EQ(paper->nsa.cmp_block, 8);
  EXPECT_EQ(paper->nsa.cmp_stride, 4);
  EXPECT_EQ(paper->nsa.sel_block, 16);
  EXPECT_EQ(paper->nsa.num_selected, 4);
  EXPECT_EQ(paper->nsa.window, 32);
  EXPECT_EQ(paper->nsa.cmp_mlp_hidden, 16);

  EXPECT_EQ(PresetConfig("tiny-llama")->arch, Architecture::kLlama);
  EXPECT_TRUE(PresetConfig("tiny-llama-tied")->tie_word_embeddings);

  for (const char* name : {"paper-nsa", "paper-dense"}) {
    auto c = PresetConfig(name);
    ASSERT_TRUE(c.ok());
    EXPECT_EQ(c->num_heads, 64) << name;
    EXPECT_EQ(c->num_kv_heads, 4) << name;
    EXPECT_EQ(c->head_dim_qk, 192) << name;
    EXPECT_EQ(c->head_dim_v, 128) << name;
    EXPECT_EQ(c->hidden_size, 2560) << name;
    EXPECT_EQ(c->num_layers, 30) << name;
    EXPECT_EQ(c->vocab_size, 32000) << name;
    EXPECT_EQ(c->max_position_embeddings, 131072) << name;
  }
  EXPECT_EQ(PresetConfig("paper-nsa")->nsa.cmp_mlp_hidden, 256);
  EXPECT_EQ(PresetConfig("paper-dense")->arch, Architecture::kLlama);
  auto fla = PresetConfig("fla-nsa");
  ASSERT_TRUE(fla.ok());
  EXPECT_EQ(fla->head_dim_qk, 64);
  EXPECT_EQ(fla->nsa.sel_block, 64);
  EXPECT_EQ(fla->nsa.num_selected, 16);
  EXPECT_EQ(fla->nsa.window, 512);
  EXPECT_EQ(PresetConfig("fla-dense")->head_dim_qk, 64);
}

TEST(Generator, GoldenValues) {
  // splitmix64 seeded with 0: the published reference sequence.
  EXPECT_EQ(SplitMix64At(0, 0), 0xe220a8397b1dcdafull);
  EXPECT_EQ(SplitMix64At(0, 1), 0x6e789e6aa1b965f4ull);
  EXPECT_EQ(SplitMix64At(0, 2), 0x06c45d188009454full);
  EXPECT_EQ(SplitMix64At(0, 3), 0xf88bb8a8724c81ecull);
  // The rest from an independent Python implementation of the algorithm in presets.h.
  const uint64_t stream = TensorStream(0, "model.norm.weight");
  EXPECT_EQ(stream, 0x4e4e52191e974f2eull);
  EXPECT_EQ(TensorStream(7, "model.norm.weight"), 0xbc212bf439ea002full);
  EXPECT_NEAR(StandardNormalAt(stream, 0), 1.8286512568701287, 1e-12);
  EXPECT_NEAR(StandardNormalAt(stream, 1), -1.089665752547702, 1e-12);
  EXPECT_NEAR(StandardNormalAt(stream, 2), -0.27276810054979095, 1e-12);
  EXPECT_NEAR(StandardNormalAt(stream, 3), 0.2826964256130458, 1e-12);

  auto c = PresetConfig("tiny-llama");
  ASSERT_TRUE(c.ok());
  const std::vector<TensorSpec> specs = TensorSpecs(*c);
  // model.norm.weight: bf16(1 + 0.1 z); e.g. 1 + 0.18287 -> 151 * 2^-7 = 1.1796875.
  Tensor norm = GenerateTensor(*c, *FindSpec(specs, "model.norm.weight"), 0);
  ASSERT_EQ(norm.data.size(), 64u);
  EXPECT_EQ(norm.data[0], 1.1796875f);
  EXPECT_EQ(norm.data[1], 0.890625f);
  EXPECT_EQ(norm.data[2], 0.97265625f);
  EXPECT_EQ(norm.data[3], 1.03125f);
  // o_proj: std 1/sqrt(64) / sqrt(2 * 2 layers) = 1/16.
  Tensor o = GenerateTensor(*c, *FindSpec(specs, "model.layers.0.self_attn.o_proj.weight"), 0);
  EXPECT_EQ(o.data[0], -0.06591796875f);
  EXPECT_EQ(o.data[1], 0.04345703125f);
  EXPECT_EQ(o.data[2], 0.05126953125f);
  Tensor e = GenerateTensor(*c, *FindSpec(specs, "model.embed_tokens.weight"), 42);
  EXPECT_EQ(e.data[0], -0.671875f);
  EXPECT_EQ(e.data[1], -0.84765625f);
  EXPECT_EQ(e.data[2], -0.1650390625f);
}

TEST(Generator, LargeTensorsDoNotDependOnThreading) {
  // 2M elements: generated in parallel chunks; each element must still be element i of the stream.
  auto c = PresetConfig("tiny-llama");
  ASSERT_TRUE(c.ok());
  TensorSpec spec{"big.weight", {2048, 1024}, nullptr};
  Tensor t = GenerateTensor(*c, spec, 11);
  ASSERT_EQ(t.data.size(), 2048u * 1024u);
  const uint64_t stream = TensorStream(11, "big.weight");
  for (uint64_t i : {uint64_t{0}, uint64_t{1}, uint64_t{1048575}, uint64_t{1048576}, uint64_t{1500001},
                     uint64_t{2097151}}) {
    const float expected = RoundToBf16(static_cast<float>(StandardNormalAt(stream, i) / 32.0));
    EXPECT_EQ(t.data[i], expected) << i;
  }
}

TEST(Generator, InitRules) {
  auto llama = PresetConfig("tiny-llama");
  auto bias = PresetConfig("tiny-nsa-qkvbias");
  auto paper = PresetConfig("tiny-nsa-paper");
  ASSERT_TRUE(llama.ok() && bias.ok() && paper.ok());
  struct Case {
    const ModelConfig* config;
    std::string name;
    double mean, std;
  };
  const std::vector<Case> cases = {
      {&*llama, "model.embed_tokens.weight", 0.0, 1.0},
      {&*llama, "model.layers.0.input_layernorm.weight", 1.0, 0.1},
      {&*llama, "model.norm.weight", 1.0, 0.1},
      {&*llama, "model.layers.0.self_attn.q_proj.weight", 0.0, 1.0 / 8},   // in = 64
      {&*llama, "model.layers.1.self_attn.o_proj.weight", 0.0, 1.0 / 16},  // 1/8 / sqrt(4)
      {&*llama, "model.layers.1.mlp.down_proj.weight", 0.0, 1.0 / std::sqrt(128.0) / 2},
      {&*llama, "model.layers.1.mlp.up_proj.weight", 0.0, 1.0 / 8},
      {&*llama, "lm_head.weight", 0.0, 1.0 / 8},
      {&*bias, "model.layers.0.attn.k_proj.bias", 0.0, 0.1},
      {&*bias, "model.layers.0.attn.g_proj.weight", 0.0, 1.0 / 8},
      {&*paper, "model.layers.0.self_attn.compress_k.pos_emb", 0.0, 0.1},
      {&*paper, "model.layers.0.self_attn.compress_k.fc1.weight", 0.0, 1.0 / std::sqrt(8.0 * 24)},  // l * d_k
      {&*paper, "model.layers.0.self_attn.compress_v.fc2.weight", 0.0, 0.25},  // hidden_c = 16
      {&*paper, "model.layers.0.self_attn.slc_k_proj.weight", 0.0, 1.0 / 8},
  };
  for (const Case& c : cases) {
    const std::vector<TensorSpec> specs = TensorSpecs(*c.config);
    const TensorSpec* spec = FindSpec(specs, c.name);
    ASSERT_NE(spec, nullptr) << c.name;
    InitRule r = InitRuleFor(*c.config, *spec);
    EXPECT_DOUBLE_EQ(r.mean, c.mean) << c.name;
    EXPECT_DOUBLE_EQ(r.std, c.std) << c.name;
  }
  // Every tensor of every preset is one of the documented kinds.
  for (const std::string& name : PresetNames()) {
    auto c = PresetConfig(name);
    ASSERT_TRUE(c.ok());
    for (const TensorSpec& s : TensorSpecs(*c)) {
      const bool known =
          absl::EndsWith(s.name, "embeddings.weight") || absl::EndsWith(s.name, "embed_tokens.weight") ||
          absl::EndsWith(s.name, "norm.weight") || absl::EndsWith(s.name, ".bias") ||
          absl::EndsWith(s.name, ".pos_emb") || (s.shape.size() == 2 && absl::EndsWith(s.name, ".weight"));
      EXPECT_TRUE(known) << name << ": " << s.name;
    }
  }
}

TEST(Generator, DeterministicPerSeedAndBf16Exact) {
  for (const std::string& name :
       {std::string("demo"), std::string("tiny-nsa-paper"), std::string("tiny-nsa-qkvbias")}) {
    auto a = MakePresetWeights(name, 1);
    auto b = MakePresetWeights(name, 1);
    auto c = MakePresetWeights(name, 2);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok()) << name;
    for (const TensorSpec& spec : TensorSpecs(a->config)) {
      const Tensor& ta = spec.slot(*a);
      const Tensor& tb = spec.slot(*b);
      const Tensor& tc = spec.slot(*c);
      ASSERT_EQ(ta.shape, spec.shape) << spec.name;
      ASSERT_EQ(ta.data, tb.data) << name << " " << spec.name << ": same seed, different values";
      size_t differ = 0;
      for (size_t i = 0; i < ta.data.size(); ++i) {
        differ += ta.data[i] != tc.data[i];
        ASSERT_EQ(FloatBits(RoundToBf16(ta.data[i])), FloatBits(ta.data[i])) << spec.name << "[" << i << "]";
        ASSERT_TRUE(std::isfinite(ta.data[i])) << spec.name << "[" << i << "]";
      }
      EXPECT_GT(differ, ta.data.size() / 2) << name << " " << spec.name << ": seeds 1 and 2 too alike";
    }
  }
}

TEST(Generator, MomentsMatchTheRules) {
  // demo's embedding (259 x 128 = 33152 draws) and layer-0 q_proj (256 x 128): sample mean and
  // variance within a few standard errors of N(0, 1) and N(0, 1/128). Deterministic for seed 0.
  auto w = MakePresetWeights("demo", 0);
  ASSERT_TRUE(w.ok());
  auto moments = [](const std::vector<float>& v) {
    double s = 0, s2 = 0;
    for (float x : v) {
      s += x;
      s2 += double(x) * x;
    }
    const double mean = s / v.size();
    return std::pair<double, double>{mean, s2 / v.size() - mean * mean};
  };
  auto [em, ev] = moments(w->embed.data);
  EXPECT_NEAR(em, 0.0, 0.03);
  EXPECT_NEAR(ev, 1.0, 0.04);
  auto [qm, qv] = moments(w->layers[0].q_proj.data);
  EXPECT_NEAR(qm, 0.0, 0.03 / std::sqrt(128.0));
  EXPECT_NEAR(qv * 128.0, 1.0, 0.04);
  auto [nm, nv] = moments(w->final_norm.data);
  EXPECT_NEAR(nm, 1.0, 0.05);
}

}  // namespace
}  // namespace needle::engine
